// Command vmnicd is the vmnic node daemon.
package main

import (
	"os"

	"github.com/vmnic/vmnic/daemon"
)

func main() { os.Exit(daemon.Main(os.Args[1:])) }
