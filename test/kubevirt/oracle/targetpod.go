package oracle

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"time"

	k8sv1 "k8s.io/api/core/v1"
	storagev1 "k8s.io/api/storage/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/tools/record"

	v1 "kubevirt.io/api/core/v1"
	migrationsv1 "kubevirt.io/api/migrations/v1alpha1"
	cdiv1 "kubevirt.io/containerized-data-importer-api/pkg/apis/core/v1beta1"

	virtcontroller "kubevirt.io/kubevirt/pkg/controller"
	netannotations "kubevirt.io/kubevirt/pkg/network/pod/annotations"
	"kubevirt.io/kubevirt/pkg/testutils"
	"kubevirt.io/kubevirt/pkg/virt-controller/watch/migration"
)

const (
	// maxPasses bounds the controller passes: it needs two or three (stamp
	// the API version annotation, move the phase to Pending, create the pod).
	maxPasses = 8
	// passTimeout bounds one pass; the controller re-queues some work with
	// a delay of a second.
	passTimeout = 20 * time.Second
)

func targetPodCmd(args []string) (any, error) {
	fs := newFlagSet("target-pod")
	vmiPath := fs.file("vmi", "VirtualMachineInstance JSON `file` (Running, status.nodeName set)", true)
	vmimPath := fs.file("vmim", "VirtualMachineInstanceMigration JSON `file` (phase unset or Pending)", true)
	sourcePath := fs.file("source-pod", "source virt-launcher pod JSON `file`", true)
	nodePath := fs.file("node", "Node JSON `file` of the VMI's node (a bare Node of that name without it)", false)
	in := fs.clusterInputs()
	if err := fs.parse(args); err != nil {
		return nil, err
	}
	var vmi v1.VirtualMachineInstance
	if err := readJSON(*vmiPath, &vmi); err != nil {
		return nil, fmt.Errorf("VMI: %w", err)
	}
	var vmim v1.VirtualMachineInstanceMigration
	if err := readJSON(*vmimPath, &vmim); err != nil {
		return nil, fmt.Errorf("VMIM: %w", err)
	}
	source, err := podOf(*sourcePath)
	if err != nil {
		return nil, err
	}
	node, err := nodeOf(*nodePath, vmi.Status.NodeName)
	if err != nil {
		return nil, err
	}
	c, err := in.cluster()
	if err != nil {
		return nil, err
	}
	return c.targetPod(&vmi, &vmim, source, node)
}

// migrationBed is the migration controller with the informers it reads.
type migrationBed struct {
	*migration.Controller
	vmis, migrations, pods, nodes cache.SharedIndexInformer
	recorder                      *record.FakeRecorder
}

// newMigrationBed builds the migration controller as its unit tests do
// (migration_test.go), with virt-controller's template service and KubeVirt's
// real network annotations generator.
func (c *fakeCluster) newMigrationBed() (*migrationBed, error) {
	b := &migrationBed{recorder: record.NewFakeRecorder(100)}
	b.vmis, _ = testutils.NewFakeInformerFor(&v1.VirtualMachineInstance{})
	b.migrations, _ = testutils.NewFakeInformerWithIndexersFor(&v1.VirtualMachineInstanceMigration{}, virtcontroller.GetVirtualMachineInstanceMigrationInformerIndexers())
	b.pods, _ = testutils.NewFakeInformerFor(&k8sv1.Pod{})
	b.nodes, _ = testutils.NewFakeInformerFor(&k8sv1.Node{})
	resourceQuotas, _ := testutils.NewFakeInformerFor(&k8sv1.ResourceQuota{})
	namespaces, _ := testutils.NewFakeInformerFor(&k8sv1.Namespace{})
	policies, _ := testutils.NewFakeInformerFor(&migrationsv1.MigrationPolicy{})
	pvcs, _ := testutils.NewFakeInformerFor(&k8sv1.PersistentVolumeClaim{})
	storageClasses, _ := testutils.NewFakeInformerFor(&storagev1.StorageClass{})
	storageProfiles, _ := testutils.NewFakeInformerFor(&cdiv1.StorageProfile{})
	kubevirts, _ := testutils.NewFakeInformerFor(&v1.KubeVirt{})
	ctrl, err := migration.NewController(
		c.templateService(pvcs.GetStore(), resourceQuotas.GetStore(), namespaces.GetStore()),
		b.vmis, b.pods, b.migrations, b.nodes, pvcs, storageClasses, storageProfiles, policies, resourceQuotas, kubevirts,
		b.recorder, c.client, c.config,
		netannotations.NewGenerator(c.config),
	)
	if err != nil {
		return nil, fmt.Errorf("migration controller: %w", err)
	}
	b.Controller = ctrl
	return b, nil
}

// targetPod runs the migration controller on vmim until it has created the
// target pod, and returns that pod.
func (c *fakeCluster) targetPod(vmi *v1.VirtualMachineInstance, vmim *v1.VirtualMachineInstanceMigration, source *k8sv1.Pod, node *k8sv1.Node) (*k8sv1.Pod, error) {
	ctx := context.Background()
	b, err := c.newMigrationBed()
	if err != nil {
		return nil, err
	}
	defer b.Queue.ShutDown()
	if err = c.seed(ctx, b, vmi, vmim, source, node); err != nil {
		return nil, err
	}

	key, err := virtcontroller.KeyFunc(vmim)
	if err != nil {
		return nil, fmt.Errorf("key of VMIM %s/%s: %w", vmim.Namespace, vmim.Name, err)
	}
	selector := v1.MigrationJobLabel + "=" + string(vmim.UID)
	for range maxPasses {
		// An informer event on the VMIM enqueues it.
		b.Queue.Add(key)
		if err := b.pass(); err != nil {
			return nil, fmt.Errorf("VMIM %s/%s: %w", vmim.Namespace, vmim.Name, err)
		}
		pods, err := c.kube.CoreV1().Pods(vmi.Namespace).List(ctx, metav1.ListOptions{LabelSelector: selector})
		if err != nil {
			return nil, fmt.Errorf("list target pods: %w", err)
		}
		if len(pods.Items) > 0 {
			return &pods.Items[0], nil
		}
		if err := c.resync(ctx, b, vmi, vmim); err != nil {
			return nil, err
		}
	}
	return nil, fmt.Errorf("the migration controller created no target pod for VMIM %s/%s in %d passes (phase %q; -v 2 shows why); events: %s",
		vmim.Namespace, vmim.Name, maxPasses, c.phase(ctx, vmim), drain(b.recorder))
}

// seed adds the objects to the API and to the informers' stores alike.
func (c *fakeCluster) seed(ctx context.Context, b *migrationBed, vmi *v1.VirtualMachineInstance, vmim *v1.VirtualMachineInstanceMigration, source *k8sv1.Pod, node *k8sv1.Node) error {
	if _, err := c.kubevirt.KubevirtV1().VirtualMachineInstances(vmi.Namespace).Create(ctx, vmi, metav1.CreateOptions{}); err != nil {
		return fmt.Errorf("add VMI %s/%s: %w", vmi.Namespace, vmi.Name, err)
	}
	if _, err := c.kubevirt.KubevirtV1().VirtualMachineInstanceMigrations(vmim.Namespace).Create(ctx, vmim, metav1.CreateOptions{}); err != nil {
		return fmt.Errorf("add VMIM %s/%s: %w", vmim.Namespace, vmim.Name, err)
	}
	if _, err := c.kube.CoreV1().Pods(source.Namespace).Create(ctx, source, metav1.CreateOptions{}); err != nil {
		return fmt.Errorf("add source pod %s/%s: %w", source.Namespace, source.Name, err)
	}
	if _, err := c.kube.CoreV1().Nodes().Create(ctx, node, metav1.CreateOptions{}); err != nil {
		return fmt.Errorf("add node %s: %w", node.Name, err)
	}
	if err := errors.Join(b.vmis.GetStore().Add(vmi), b.migrations.GetStore().Add(vmim),
		b.pods.GetStore().Add(source), b.nodes.GetStore().Add(node)); err != nil {
		return fmt.Errorf("seed the informers: %w", err)
	}
	return nil
}

// pass runs the controller once, bounded in time.
func (b *migrationBed) pass() error {
	done := make(chan struct{})
	go func() {
		defer close(done)
		b.Execute()
	}()
	select {
	case <-done:
		return nil
	case <-time.After(passTimeout):
		b.Queue.ShutDown()
		<-done
		return fmt.Errorf("a pass of the migration controller took over %s", passTimeout)
	}
}

// resync copies the API's VMI and VMIM into the informers' stores, as the
// informers would.
func (c *fakeCluster) resync(ctx context.Context, b *migrationBed, vmi *v1.VirtualMachineInstance, vmim *v1.VirtualMachineInstanceMigration) error {
	curVMI, err := c.kubevirt.KubevirtV1().VirtualMachineInstances(vmi.Namespace).Get(ctx, vmi.Name, metav1.GetOptions{})
	if err != nil {
		return fmt.Errorf("get VMI %s/%s: %w", vmi.Namespace, vmi.Name, err)
	}
	curVMIM, err := c.kubevirt.KubevirtV1().VirtualMachineInstanceMigrations(vmim.Namespace).Get(ctx, vmim.Name, metav1.GetOptions{})
	if err != nil {
		return fmt.Errorf("get VMIM %s/%s: %w", vmim.Namespace, vmim.Name, err)
	}
	if err := errors.Join(b.vmis.GetStore().Update(curVMI), b.migrations.GetStore().Update(curVMIM)); err != nil {
		return fmt.Errorf("resync the informers: %w", err)
	}
	return nil
}

func (c *fakeCluster) phase(ctx context.Context, vmim *v1.VirtualMachineInstanceMigration) v1.VirtualMachineInstanceMigrationPhase {
	cur, err := c.kubevirt.KubevirtV1().VirtualMachineInstanceMigrations(vmim.Namespace).Get(ctx, vmim.Name, metav1.GetOptions{})
	if err != nil {
		return "unknown: " + v1.VirtualMachineInstanceMigrationPhase(err.Error())
	}
	return cur.Status.Phase
}

// drain returns the events recorded so far.
func drain(r *record.FakeRecorder) string {
	var events []string
	for {
		select {
		case e := <-r.Events:
			events = append(events, e)
		default:
			if len(events) == 0 {
				return "none"
			}
			return strings.Join(events, "; ")
		}
	}
}
