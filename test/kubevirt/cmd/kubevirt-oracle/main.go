// Command kubevirt-oracle answers vmnic's tests with what KubeVirt's own
// code does; see package oracle.
package main

import (
	"os"

	"github.com/vmnic/vmnic/test/kubevirt/oracle"
)

func main() {
	stdout := os.Stdout
	// Whatever KubeVirt prints lands on stderr: stdout carries only the
	// answer.
	os.Stdout = os.Stderr
	os.Exit(oracle.Main(os.Args[1:], stdout, os.Stderr))
}
