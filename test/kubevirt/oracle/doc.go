// Package oracle answers vmnic's tests with what KubeVirt itself would do:
// every answer comes from KubeVirt's own exported functions, imported at a
// pinned release (kubevirt.io/kubevirt v1.8.2), never from a copy of them or
// from what vmnic believes KubeVirt does. The kubevirt-oracle command
// (cmd/kubevirt-oracle) runs it; vmnic's test/kvoracle package calls that
// command.
//
// It is a module of its own because KubeVirt pins the Kubernetes libraries
// (k8s.io/api, client-go, ...) to 0.34 through replace directives that any
// module importing it has to repeat, while vmnic itself is on 0.36. The JSON
// the command reads and writes is the wire format between the two.
//
// Subcommands, each reading JSON files named by flags and writing one JSON
// object to stdout (KubeVirt's log goes to stderr; an error is printed there
// and exits 1):
//
//   - domain: the domain interfaces virt-launcher derives for tap-attached
//     NICs (binding plugins with domainAttachmentType tap) from a pod network
//     namespace, as virt-launcher's domain manager does: the converter's
//     network DomainConfigurator, then VMNetworkConfigurator's
//     SetupPodNetworkPhase2 inside the namespace, plus the pod interface
//     link.DiscoverByNetwork finds per network. VMIs with core masquerade or
//     bridge interfaces are refused: for those SetupPodNetworkPhase2 starts
//     KubeVirt's DHCP server in the namespace and panics when it cannot.
//   - names: per VMI network, the pod interface, tap, bridge and "-nic" names
//     of KubeVirt's hashed and ordinal naming schemes.
//   - launcher-pod: the virt-launcher pod virt-controller renders for a VMI:
//     a TemplateService built as virt-controller's application builds it
//     (sidecar creators, network memory calculator, network and storage
//     annotation generators, so the Multus annotations are KubeVirt's), its
//     RenderLaunchManifest, and the namespace the VMI controller creates the
//     pod in (its private createPod posts the pod to the VMI's namespace; the
//     API server then appends a random suffix to generateName, which the
//     output leaves empty).
//   - target-pod: the migration target pod KubeVirt's migration controller
//     creates, by running that controller (migration.NewController with
//     KubeVirt's fake informers, a mock KubevirtClient over fake clientsets,
//     KubeVirt's real network annotations generator) on the given VMI, VMIM
//     and source pod until it has created the pod.
//
// What target-pod needs, found in the migration controller's sync: the VMI
// Running with status.nodeName set, and status.selinuxContext set unless the
// KubeVirt configuration sets migrations.matchSELinuxLevelOnMigration to
// false (the controller copies its level to the target pod); the source pod
// in the VMI's namespace, controlled by the VMI (an ownerReference with
// controller true and the VMI's UID, as RenderLaunchManifest sets it), with
// spec.nodeName equal to
// the VMI's status.nodeName and not Succeeded or Failed; the VMIM in the
// VMI's namespace with spec.vmiName, a UID, phase unset or Pending, no
// sendTo/receive (not decentralized), no evacuation/workload-update
// annotation with failed predecessors (backoff), and no other unfinished
// migration owning the VMI's status.migrationState. The VMI has no utility
// volumes. The Node of status.nodeName must exist (the controller reads its
// labels for the CPU vendor node selector); the oracle adds a bare one when
// none is given. The controller first stamps the VMIM with its API-version
// annotation and moves an unset phase to Pending, each in a separate pass:
// the oracle feeds the fake clientsets' objects back into the informers'
// stores between passes, as the informers would. Before rendering, the
// controller also patches the VMI's runtimeUser and its kubevirt.io/nonroot
// annotation, which the target pod then carries.
//
// Every subcommand takes -v N, the verbosity of KubeVirt's log on stderr.
//
// Why v1.8.2 and not v1.9.0: v1.9.0's pkg/controller (which the template
// service and the migration controller import) needs
// kubevirt.io/virt-template-api and kubevirt.io/virt-template-client-go
// v0.2.0, and the module proxy this project builds with does not serve
// them; v1.8.2 imports only modules it serves. The code this oracle runs for
// the domain interface and the names (pkg/network/link, domainspec,
// namescheme and the converter's network configurator) is the same, file
// for file, in both releases.
package oracle
