package ovs

import (
	"bufio"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

func TestStartRestartStop(t *testing.T) {
	o := StartT(t)
	if !strings.HasPrefix(o.DB(), "unix:"+o.Dir()) {
		t.Errorf("DB() = %q, want a socket in %q", o.DB(), o.Dir())
	}
	if _, err := o.Vsctl("add-br", "br0", "--", "set", "bridge", "br0", "datapath_type=netdev"); err != nil {
		t.Fatal(err)
	}
	if v, err := o.Vsctl("get", "Open_vSwitch", ".", "ovs_version"); err != nil || v == "" || v == "[]" {
		t.Errorf("ovs_version = %q, %v", v, err)
	}
	if out, err := o.Appctl("dpif/show"); err != nil || !strings.Contains(out, "br0") {
		t.Errorf("ovs-vswitchd does not show br0: %q %v", out, err)
	}

	if err := o.KillDB(); err != nil {
		t.Fatal(err)
	}
	if _, err := o.Vsctl("--timeout=2", "list-br"); err == nil {
		t.Error("ovs-vsctl worked with ovsdb-server killed")
	}
	if err := o.StartDB(); err != nil {
		t.Fatal(err)
	}
	// Same database file: the bridge is still there, and ovs-vswitchd
	// (which reconnects by itself) applies new changes.
	if out, err := o.Vsctl("list-br"); err != nil || out != "br0" {
		t.Errorf("after restart list-br = %q, %v", out, err)
	}
	if _, err := o.Vsctl("add-br", "br1", "--", "set", "bridge", "br1", "datapath_type=netdev"); err != nil {
		t.Errorf("add-br after restart (waits for ovs-vswitchd): %v", err)
	}

	if err := o.Stop(); err != nil {
		t.Fatal(err)
	}
	for _, f := range []string{"conf.db", "ovsdb-server.log", "ovs-vswitchd.log"} {
		if _, err := os.Stat(filepath.Join(o.Dir(), f)); err != nil {
			t.Errorf("Stop removed %s: %v", f, err)
		}
	}
}

func TestStartRejectsLongDir(t *testing.T) {
	_, err := Start("/tmp/" + strings.Repeat("x", 100))
	if err == nil || !strings.Contains(err.Error(), "too long") {
		t.Errorf("Start(long dir) = %v, want a path-length error", err)
	}
}

// TestDaemonsDieWithTest runs a copy of the test binary that starts a switch
// and is then killed with SIGKILL, as a crashing or timed-out test would be:
// both daemons must go with it.
func TestDaemonsDieWithTest(t *testing.T) {
	if dir := os.Getenv("VMNIC_OVS_CHILD_DIR"); dir != "" {
		if _, err := Start(dir); err != nil {
			os.Stdout.WriteString("error: " + err.Error() + "\n")
			os.Exit(1)
		}
		os.Stdout.WriteString("ready\n")
		select {} // until killed
	}
	StartT(t).Stop() // skips unless root and OVS are here
	dir := t.TempDir()
	if len(dir) > 60 {
		var err error
		if dir, err = os.MkdirTemp("", "ovsc"); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = os.RemoveAll(dir) })
	}
	child := exec.Command(os.Args[0], "-test.run=^TestDaemonsDieWithTest$")
	child.Env = append(os.Environ(), "VMNIC_OVS_CHILD_DIR="+dir)
	out, err := child.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err = child.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { _ = child.Process.Kill(); _ = child.Wait() }()
	line, err := bufio.NewReader(out).ReadString('\n')
	if err != nil || line != "ready\n" {
		t.Fatalf("child: %q %v\n%s", line, err, tailLogs(dir, 20))
	}
	var pids []int
	for _, name := range []string{"ovsdb-server", "ovs-vswitchd"} {
		data, err := os.ReadFile(filepath.Join(dir, name+".pid"))
		if err != nil {
			t.Fatalf("%s pidfile: %v", name, err)
		}
		pid, err := strconv.Atoi(strings.TrimSpace(string(data)))
		if err != nil {
			t.Fatalf("%s pidfile: %v", name, err)
		}
		pids = append(pids, pid)
	}
	if err := child.Process.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	_ = child.Wait()
	deadline := time.Now().Add(5 * time.Second)
	for _, pid := range pids {
		for alive(pid) {
			if time.Now().After(deadline) {
				_ = syscall.Kill(pid, syscall.SIGKILL)
				t.Fatalf("daemon pid %d outlived the killed test process", pid)
			}
			time.Sleep(20 * time.Millisecond)
		}
	}
}

// alive reports whether pid is a live process (not a zombie: the daemons'
// parent is gone, so init reaps them).
func alive(pid int) bool {
	if err := syscall.Kill(pid, 0); errors.Is(err, syscall.ESRCH) {
		return false
	}
	stat, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return false
	}
	_, rest, _ := strings.Cut(string(stat), ") ")
	return !strings.HasPrefix(rest, "Z")
}

// TestDaemonsSurviveThreadExits ends many OS threads (a goroutine that exits
// while locked to its thread takes the thread with it, as netns helpers do)
// after the switch started: the parent-death signal must not fire.
func TestDaemonsSurviveThreadExits(t *testing.T) {
	o := StartT(t)
	for range 50 {
		done := make(chan struct{})
		go func() {
			runtime.LockOSThread()
			close(done)
		}()
		<-done
		runtime.Gosched()
	}
	time.Sleep(100 * time.Millisecond)
	if _, err := o.Vsctl("--timeout=5", "add-br", "br0", "--", "set", "bridge", "br0", "datapath_type=netdev"); err != nil {
		t.Fatalf("switch after thread exits: %v", err)
	}
}
