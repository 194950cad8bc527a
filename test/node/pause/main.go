// Command pause is the real node's sandbox image and test containers'
// program (no registry is reachable to pull registry.k8s.io/pause): it
// waits for SIGTERM or SIGINT and exits 0, as the pause container does. Run
// as PID 1 of a container, it also reaps children it inherits.
package main

import (
	"os"
	"os/signal"
	"syscall"
)

func main() {
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGTERM, syscall.SIGINT, syscall.SIGCHLD)
	for s := range sig {
		if s != syscall.SIGCHLD {
			os.Exit(0)
		}
		for {
			pid, err := syscall.Wait4(-1, nil, syscall.WNOHANG, nil)
			if pid <= 0 || err != nil {
				break
			}
		}
	}
}
