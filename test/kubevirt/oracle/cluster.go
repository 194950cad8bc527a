package oracle

import (
	"context"
	"fmt"
	"path/filepath"

	networkv1 "github.com/k8snetworkplumbingwg/network-attachment-definition-client/pkg/apis/k8s.cni.cncf.io/v1"
	"go.uber.org/mock/gomock"
	k8sv1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes/fake"
	"k8s.io/client-go/tools/cache"

	v1 "kubevirt.io/api/core/v1"
	"kubevirt.io/client-go/kubecli"
	kubevirtfake "kubevirt.io/client-go/kubevirt/fake"
	fakenetworkclient "kubevirt.io/client-go/networkattachmentdefinitionclient/fake"

	"kubevirt.io/kubevirt/pkg/hooks"
	"kubevirt.io/kubevirt/pkg/network/netbinding"
	netannotations "kubevirt.io/kubevirt/pkg/network/pod/annotations"
	netresources "kubevirt.io/kubevirt/pkg/network/resources"
	storageannotations "kubevirt.io/kubevirt/pkg/storage/pod/annotations"
	"kubevirt.io/kubevirt/pkg/testutils"
	"kubevirt.io/kubevirt/pkg/util"
	virtconfig "kubevirt.io/kubevirt/pkg/virt-config"
	"kubevirt.io/kubevirt/pkg/virt-controller/services"
)

// virt-controller's flag defaults (pkg/virt-controller/watch/application.go,
// unexported there). A real install passes virt-operator's image names.
const (
	launcherImage       = "virt-launcher"
	exporterImage       = "virt-exportserver"
	launcherQemuTimeout = 240
	imagePullSecret     = ""
	launcherSubGid      = 107
)

var (
	ephemeralDiskDir = util.VirtShareDir + "-ephemeral-disks"
	containerDiskDir = filepath.Join(util.VirtShareDir, "container-disks")
	hotplugDiskDir   = filepath.Join(util.VirtShareDir, "hotplug-disks")
)

// fakeCluster is an API server made of fake clientsets behind KubeVirt's
// mock KubevirtClient, wired as the migration controller's unit tests wire
// it, with a cluster config from the KubeVirt CR's configuration.
type fakeCluster struct {
	config   *virtconfig.ClusterConfig
	client   *kubecli.MockKubevirtClient
	kube     *fake.Clientset
	kubevirt *kubevirtfake.Clientset
	network  *fakenetworkclient.Clientset
}

func newFakeCluster(kv *v1.KubeVirt, nads []networkv1.NetworkAttachmentDefinition) (*fakeCluster, error) {
	config, _, _ := testutils.NewFakeClusterConfigUsingKVConfig(&kv.Spec.Configuration)
	c := &fakeCluster{
		config:   config,
		client:   kubecli.NewMockKubevirtClient(gomock.NewController(panicReporter{})),
		kube:     fake.NewSimpleClientset(),
		kubevirt: kubevirtfake.NewSimpleClientset(),
		network:  fakenetworkclient.NewSimpleClientset(),
	}
	for i := range nads {
		nad := &nads[i]
		if _, err := c.network.K8sCniCncfIoV1().NetworkAttachmentDefinitions(nad.Namespace).Create(context.Background(), nad, metav1.CreateOptions{}); err != nil {
			return nil, fmt.Errorf("add NetworkAttachmentDefinition %s/%s: %w", nad.Namespace, nad.Name, err)
		}
	}
	e := c.client.EXPECT()
	e.VirtualMachineInstanceMigration(gomock.Any()).DoAndReturn(func(ns string) kubecli.VirtualMachineInstanceMigrationInterface {
		return c.kubevirt.KubevirtV1().VirtualMachineInstanceMigrations(ns)
	}).AnyTimes()
	e.VirtualMachineInstance(gomock.Any()).DoAndReturn(func(ns string) kubecli.VirtualMachineInstanceInterface {
		return c.kubevirt.KubevirtV1().VirtualMachineInstances(ns)
	}).AnyTimes()
	e.CoreV1().Return(c.kube.CoreV1()).AnyTimes()
	e.PolicyV1().Return(c.kube.PolicyV1()).AnyTimes()
	e.NetworkClient().Return(c.network).AnyTimes()
	e.MigrationPolicy().Return(c.kubevirt.MigrationsV1alpha1().MigrationPolicies()).AnyTimes()
	return c, nil
}

// templateService is virt-controller's TemplateService with the options its
// application builds it with (application.go).
func (c *fakeCluster) templateService(pvcs, resourceQuotas, namespaces cache.Store) *services.TemplateService {
	netAnnotationsGenerator := netannotations.NewGenerator(c.config)
	return services.NewTemplateService(launcherImage,
		launcherQemuTimeout,
		util.VirtShareDir,
		ephemeralDiskDir,
		containerDiskDir,
		hotplugDiskDir,
		imagePullSecret,
		pvcs,
		c.client,
		c.config,
		launcherSubGid,
		exporterImage,
		resourceQuotas,
		namespaces,
		services.WithSidecarCreator(
			func(vmi *v1.VirtualMachineInstance, _ *v1.KubeVirtConfiguration) (hooks.HookSidecarList, error) {
				return hooks.UnmarshalHookSidecarList(vmi)
			}),
		services.WithSidecarCreator(netbinding.NetBindingPluginSidecarList),
		services.WithNetMemoryCalculator(netresources.MemoryCalculator{}),
		services.WithAnnotationsGenerators(netAnnotationsGenerator, storageannotations.Generator{}),
		services.WithNetTargetAnnotationsGenerator(netAnnotationsGenerator),
	)
}

// emptyStore is an in-memory store with nothing in it.
func emptyStore() cache.Store {
	return cache.NewIndexer(cache.MetaNamespaceKeyFunc, cache.Indexers{cache.NamespaceIndex: cache.MetaNamespaceIndexFunc})
}

// panicReporter makes an unexpected call on the mock client (KubeVirt using
// a client the oracle does not provide) fail the command loudly.
type panicReporter struct{}

func (panicReporter) Errorf(format string, args ...any) { panic(fmt.Sprintf(format, args...)) }
func (panicReporter) Fatalf(format string, args ...any) { panic(fmt.Sprintf(format, args...)) }

// clusterInputs are the inputs launcher-pod and target-pod share.
type clusterInputs struct {
	kubevirt, nads *string
}

func (fs *flagSet) clusterInputs() clusterInputs {
	return clusterInputs{
		kubevirt: fs.file("kubevirt", "KubeVirt CR JSON `file` (its spec.configuration is used; empty configuration without it)", false),
		nads:     fs.file("nads", "`file` with a JSON list of the NetworkAttachmentDefinitions the VMI's Multus networks use", false),
	}
}

func (in clusterInputs) cluster() (*fakeCluster, error) {
	var kv v1.KubeVirt
	if err := readJSON(*in.kubevirt, &kv); err != nil {
		return nil, fmt.Errorf("KubeVirt: %w", err)
	}
	var nads []networkv1.NetworkAttachmentDefinition
	if err := readJSON(*in.nads, &nads); err != nil {
		return nil, fmt.Errorf("NetworkAttachmentDefinitions: %w", err)
	}
	return newFakeCluster(&kv, nads)
}

// nodeOf reads a node input, or makes a bare Node named name without one.
func nodeOf(path, name string) (*k8sv1.Node, error) {
	node := &k8sv1.Node{ObjectMeta: metav1.ObjectMeta{Name: name}}
	if err := readJSON(path, node); err != nil {
		return nil, fmt.Errorf("node: %w", err)
	}
	return node, nil
}

// podOf reads a pod input.
func podOf(path string) (*k8sv1.Pod, error) {
	var pod k8sv1.Pod
	if err := readJSON(path, &pod); err != nil {
		return nil, fmt.Errorf("pod: %w", err)
	}
	return &pod, nil
}
