// Package version holds the release every vmnic binary reports: the shim
// (CNI VERSION's about text), vmnicd (its status and metrics) and vmnicctl.
// The build sets it with one ldflag:
//
//	-X github.com/vmnic/vmnic/pkg/version.Version=v1.2.3
package version

// Version is the release, "dev" for a build that did not set it.
var Version = "dev"
