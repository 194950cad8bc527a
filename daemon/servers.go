package daemon

import (
	"context"
	"log/slog"
	"sync"

	"github.com/vmnic/vmnic/pkg/dhcp"
)

// Servers keeps the DHCP servers of the attachments, keyed by attachment.
// They live as long as the daemon, not as long as the request that started
// them.
type Servers struct {
	mu      sync.Mutex
	log     *slog.Logger
	running map[string]*dhcp.Server
}

// NewServers returns an empty registry.
func NewServers(log *slog.Logger) *Servers {
	return &Servers{log: log, running: map[string]*dhcp.Server{}}
}

// Start replaces any server of key with a new one.
func (s *Servers) Start(_ context.Context, key string, cfg dhcp.Config) error {
	s.Stop(key)
	srv, err := dhcp.Start(context.Background(), cfg)
	if err != nil {
		return err
	}
	s.mu.Lock()
	s.running[key] = srv
	s.mu.Unlock()
	return nil
}

// Stop stops the servers of key, if any.
func (s *Servers) Stop(key string) {
	s.mu.Lock()
	srv := s.running[key]
	delete(s.running, key)
	s.mu.Unlock()
	if srv != nil {
		srv.Stop()
	}
}

// Running reports whether key has servers.
func (s *Servers) Running(key string) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.running[key] != nil
}

// Count is the number of attachments with servers.
func (s *Servers) Count() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.running)
}

// StopAll stops every server (daemon shutdown).
func (s *Servers) StopAll() {
	s.mu.Lock()
	all := s.running
	s.running = map[string]*dhcp.Server{}
	s.mu.Unlock()
	for _, srv := range all {
		srv.Stop()
	}
}
