package install

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// watchRetry is how often Watch tries to set up its inotify watch when the
// config dir is missing (the primary CNI has not created it yet) or went
// away. A variable for tests.
var watchRetry = 2 * time.Second

// Watch chains vmnic (see Chain) now, and again whenever the config dir
// changes: a primary CNI rewriting its file without vmnic's entry (Calico's
// or Cilium's agent restarting), a new primary appearing first in order. A
// burst of changes is chained once, opts.Debounce after its first event;
// opts.Resync re-chains anyway. Its own writes come back as events, and the
// Chain that follows them writes nothing, so it does not loop. A failed
// Chain is logged, passed to opts.OnChain and tried again with backoff.
// Watch returns nil when ctx is done.
func Watch(ctx context.Context, opts Options) error {
	c, err := opts.config()
	if err != nil {
		return err
	}
	log := c.Logger.With("dir", c.ConfDir)

	var w *dirWatch
	defer func() {
		if w != nil {
			w.close()
		}
	}()
	var events <-chan dirEvent
	var werrs <-chan error
	setup := func() bool {
		dir, err := realDir(c.ConfDir)
		if err == nil {
			w, err = watchDir(dir)
		}
		if err != nil {
			log.Debug("cannot watch the config dir yet", "err", err)
			return false
		}
		events, werrs = w.events, w.errs
		return true
	}
	drop := func() {
		w.close()
		w, events, werrs = nil, nil, nil
	}

	// pending fires the next Chain; at most one is scheduled.
	pending := time.NewTimer(0) // the first Chain right away
	scheduled := true
	schedule := func(d time.Duration) {
		if !scheduled {
			pending.Reset(d)
			scheduled = true
		}
	}
	resync := time.NewTicker(c.Resync)
	defer resync.Stop()
	retry := time.NewTicker(watchRetry)
	defer retry.Stop()
	backoff := time.Duration(0)
	lastErr := ""

	setup()
	for {
		select {
		case <-ctx.Done():
			pending.Stop()
			return nil
		case ev := <-events:
			switch {
			case ev.mask&(unix.IN_IGNORED|unix.IN_DELETE_SELF|unix.IN_MOVE_SELF) != 0:
				log.Info("config dir went away, waiting for it")
				drop()
				schedule(c.Debounce)
			case ev.mask&unix.IN_Q_OVERFLOW != 0 || isConfName(ev.name):
				schedule(c.Debounce)
			}
		case err := <-werrs:
			log.Warn("config dir watch failed, setting it up again", "err", err)
			drop()
			schedule(c.Debounce)
		case <-retry.C:
			if w == nil && setup() {
				log.Info("watching the config dir")
				schedule(0) // what appeared meanwhile
			}
		case <-resync.C:
			schedule(0)
		case <-pending.C:
			scheduled = false
			res, err := Chain(c.Options)
			if c.OnChain != nil {
				c.OnChain(res, err)
			}
			// The same failure again is logged at debug level only:
			// resyncs and retries would repeat it every time.
			repeated := err != nil && lastErr != "" && err.Error() == lastErr
			lastErr = ""
			if err == nil {
				backoff = 0
				continue
			}
			lastErr = err.Error()
			level := slog.LevelWarn
			if repeated {
				level = slog.LevelDebug
			}
			if errors.Is(err, ErrNoPrimary) {
				// Usual before the primary CNI is installed; its
				// file appearing is an event.
				log.Log(ctx, min(level, slog.LevelInfo), "no primary CNI config yet", "err", err)
				continue
			}
			backoff = min(max(2*backoff, time.Second), c.Resync)
			log.Log(ctx, level, "chain vmnic", "err", err, "retry", backoff)
			schedule(backoff)
		}
	}
}

// dirEvent is one inotify event of the watched directory.
type dirEvent struct {
	mask uint32
	name string // "" for the directory itself
}

// dirWatch is an inotify watch of one directory.
type dirWatch struct {
	f      *os.File
	events chan dirEvent
	errs   chan error
	done   chan struct{}
}

// dirMask: what a writer of a config file does (create, close after write,
// rename in or out, delete) and the directory itself going away.
const dirMask = unix.IN_CREATE | unix.IN_CLOSE_WRITE | unix.IN_MOVED_TO | unix.IN_MOVED_FROM |
	unix.IN_DELETE | unix.IN_ATTRIB | unix.IN_DELETE_SELF | unix.IN_MOVE_SELF | unix.IN_ONLYDIR

func watchDir(dir string) (*dirWatch, error) {
	// Non-blocking, so that os.File reads through the runtime poller and
	// Close interrupts a pending read.
	fd, err := unix.InotifyInit1(unix.IN_CLOEXEC | unix.IN_NONBLOCK)
	if err != nil {
		return nil, fmt.Errorf("inotify init: %w", err)
	}
	if _, err := unix.InotifyAddWatch(fd, dir, dirMask); err != nil {
		_ = unix.Close(fd)
		return nil, fmt.Errorf("inotify watch %q: %w", dir, err)
	}
	w := &dirWatch{
		f:      os.NewFile(uintptr(fd), "inotify:"+filepath.Clean(dir)),
		events: make(chan dirEvent),
		errs:   make(chan error, 1),
		done:   make(chan struct{}),
	}
	go w.read()
	return w, nil
}

func (w *dirWatch) close() {
	close(w.done)
	_ = w.f.Close()
}

func (w *dirWatch) read() {
	buf := make([]byte, 64*(unix.SizeofInotifyEvent+unix.NAME_MAX+1))
	for {
		n, err := w.f.Read(buf)
		if err != nil {
			select {
			case <-w.done:
			case w.errs <- fmt.Errorf("read inotify: %w", err):
			}
			return
		}
		for off := 0; off+unix.SizeofInotifyEvent <= n; {
			raw := (*unix.InotifyEvent)(unsafe.Pointer(&buf[off]))
			ev := dirEvent{mask: raw.Mask}
			nameStart := off + unix.SizeofInotifyEvent
			nameEnd := min(nameStart+int(raw.Len), n)
			if raw.Len > 0 {
				name := buf[nameStart:nameEnd]
				for len(name) > 0 && name[len(name)-1] == 0 {
					name = name[:len(name)-1]
				}
				ev.name = string(name)
			}
			off = nameEnd
			select {
			case w.events <- ev:
			case <-w.done:
				return
			}
		}
	}
}
