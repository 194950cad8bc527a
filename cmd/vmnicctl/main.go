// Command vmnicctl inspects and checks vmnic; installed as kubectl-vmnic it
// is a kubectl plugin (kubectl vmnic doctor).
package main

import (
	"os"

	"github.com/vmnic/vmnic/pkg/ctl"
)

func main() { os.Exit(ctl.Main(os.Args, os.Stdout, os.Stderr)) }
