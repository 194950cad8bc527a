// Command vmnic is the CNI plugin (shim) that the runtime executes.
package main

import "github.com/vmnic/vmnic/pkg/shim"

func main() { shim.Main() }
