package soak

import (
	"context"
	"crypto/x509"
	"errors"
	"fmt"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"

	ferryv1 "github.com/vfio-ferry/ferry/api/proto/ferry/v1"
	"github.com/vfio-ferry/ferry/pkg/ephemeralca"
	"github.com/vfio-ferry/ferry/services/chunkwire"
	"github.com/vfio-ferry/ferry/services/grpcserver"
	"github.com/vfio-ferry/ferry/services/peerauth"
)

// The agents of a soak: starting them with the run's certificates, the
// control plane's clients, restarts, warm-ups and baselines.

// agents are every agent, sources first, in a fixed order.
func (s *soak) agents() []*agent {
	out := []*agent{s.sources[false], s.sources[true]}
	for _, l := range lanes {
		out = append(out, s.dests[l])
	}
	if out[0] == nil {
		return nil
	}
	return out
}

// soakCerts are the run's certificates, from a CA made for it.
type soakCerts struct {
	agent, client peerauth.TLSFiles
}

const (
	agentID  = "spiffe://ferry.soak/agent"
	clientID = "spiffe://ferry.soak/control-plane"
)

// startAgents starts a source per security setting and a destination
// per lane.
func (s *soak) startAgents(ctx context.Context) error {
	ca, err := ephemeralca.New(s.logDir, "ferry soak CA")
	if err != nil {
		return err
	}
	sans := []string{"127.0.0.1", agentID}
	for k := range proxyHosts {
		sans = append(sans, proxyHost(k))
	}
	ag, err := ca.Issue(ephemeralca.Options{}, sans...)
	if err != nil {
		return err
	}
	cl, err := ca.Issue(ephemeralca.Options{Usages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}}, clientID)
	if err != nil {
		return err
	}
	s.certs = &soakCerts{agent: peerauth.TLSFiles(ag), client: peerauth.TLSFiles(cl)}
	common := []string{"--allow-sim", "--device-timeout", deviceTimeout.String()}
	sec := func(tls, transfer bool) []string {
		if !tls {
			return []string{"--insecure"}
		}
		a := []string{"--tls-cert", s.certs.agent.Cert, "--tls-key", s.certs.agent.Key, "--tls-ca", s.certs.agent.CA, "--allow-client", clientID}
		if transfer {
			a = append(a, "--allow-peer", agentID)
		}
		return a
	}
	for _, tls := range []bool{false, true} {
		name := "source-plain"
		if tls {
			name = "source-tls"
		}
		args := append(append(append([]string{"source"}, sourceFlags...), common...), sec(tls, false)...)
		s.sources[tls] = &agent{name: name, role: "source", exe: s.cfg.Exe, args: args, logPath: filepath.Join(s.logDir, name+".log")}
	}
	for _, l := range lanes {
		name := "dest-" + l.String()
		args := append(append(append([]string{"dest"}, destFlags...), common...), sec(l.TLS, true)...)
		args = append(args, "--memory-budget", fmt.Sprint(s.cfg.destBudget()))
		s.dests[l] = &agent{name: name, role: "dest", exe: s.cfg.Exe, args: args, logPath: filepath.Join(s.logDir, name+".log"), data: l.Direct}
	}
	for _, a := range s.agents() {
		s.restartMu[a] = &sync.Mutex{}
		if err := a.start(ctx); err != nil {
			return err
		}
		creds, err := s.creds(a)
		if err != nil {
			return err
		}
		conn, err := grpc.NewClient(a.Addr(), grpcserver.DialOptions(creds, chunkwire.NewPool())...)
		if err != nil {
			return err
		}
		s.conns[a] = conn
	}
	return nil
}

// creds are the control plane's credentials for a.
func (s *soak) creds(a *agent) (credentials.TransportCredentials, error) {
	if !strings.Contains(strings.Join(a.args, " "), "--tls-cert") {
		return insecure.NewCredentials(), nil
	}
	c, err := peerauth.ClientTLS(s.certs.client, "")
	if err != nil {
		return nil, err
	}
	return credentials.NewTLS(c), nil
}

func (s *soak) destClient(a *agent) ferryv1.DestAgentClient {
	return ferryv1.NewDestAgentClient(s.conns[a])
}
func (s *soak) sourceClient(a *agent) ferryv1.SourceAgentClient {
	return ferryv1.NewSourceAgentClient(s.conns[a])
}

// restart kills an agent and starts it again on its addresses. Its
// baseline goes: a new process is measured afresh after a warm-up.
func (s *soak) restart(ctx context.Context, a *agent) error {
	mu := s.restartMu[a]
	mu.Lock()
	defer mu.Unlock()
	s.mu.Lock()
	delete(s.base, a)
	s.mu.Unlock()
	return a.restart(ctx)
}

// stop kills every agent and closes the clients.
func (s *soak) stop() {
	for _, a := range s.agents() {
		a.kill()
		if c := s.conns[a]; c != nil {
			c.Close()
		}
	}
}

// warmUp runs one migration without faults on every lane of the given
// agents, then takes their baselines: goroutines, fds and RSS of an
// agent that has migrated once and is idle.
func (s *soak) warmUp(ctx context.Context, which []*agent) (*ViolationReport, error) {
	want := map[*agent]bool{}
	for _, a := range which {
		want[a] = true
	}
	var ls []lane
	for _, l := range lanes {
		if want[s.sources[l.TLS]] || want[s.dests[l]] {
			ls = append(ls, l)
		}
	}
	for i, l := range ls {
		slotIdx := i % len(s.planner.slots)
		sl := s.planner.slots[slotIdx]
		p := &migrationPlan{ID: fmt.Sprintf("soak-%d-warmup-%d-%d", s.cfg.Seed, s.planner.next, i), Round: -1, Lane: l,
			Channels: 4, ChunkSize: 1 << 20, MaxBytes: 0, Devices: []devicePlan{{Slot: slotIdx, Src: sl.base, Dst: sl.base, Size: sl.size}}}
		s.planner.next++
		canonical(p)
		m, err := s.newRun(p, 0)
		if err != nil {
			return nil, err
		}
		o, err := m.run(ctx)
		m.closeProxies()
		if err == nil {
			err = s.checkMigration(ctx, m, o)
		}
		if err == nil && o.Phase != "SUCCEEDED" {
			err = violate(invVerified, "a warm-up migration without faults ended %s: %s", o.Phase, o.Message)
		}
		if err == nil {
			err = s.release(ctx, m, o)
		}
		if err != nil {
			var v *violation
			if !errors.As(err, &v) {
				v = violate("soak", "%v", err)
			}
			return s.violationReport(v, m, o), nil
		}
	}
	for _, a := range which {
		// The level the agent settles at once idle: the lowest of a few
		// reads, as goroutines of the warm-up's streams finish.
		var best usage
		for i := range 20 {
			u, err := s.usage(ctx, a)
			if err != nil {
				return nil, err
			}
			if i == 0 || u.Goroutines < best.Goroutines {
				best.Goroutines = u.Goroutines
			}
			if i == 0 || u.FDs < best.FDs {
				best.FDs = u.FDs
			}
			best.RSS = max(best.RSS, u.RSS)
			best.Devices = u.Devices
			t := time.NewTimer(50 * time.Millisecond)
			select {
			case <-ctx.Done():
				t.Stop()
				return nil, ctx.Err()
			case <-t.C:
			}
		}
		s.mu.Lock()
		s.base[a] = best
		s.mu.Unlock()
	}
	return nil, nil
}

// usage is the agent's usage with its open devices counted.
func (s *soak) usage(ctx context.Context, a *agent) (usage, error) {
	u, err := a.usage(ctx)
	if err != nil {
		return u, err
	}
	devs, err := s.listDevices(ctx, a)
	if err != nil {
		return u, err
	}
	u.Devices = len(devs)
	return u, nil
}

func (s *soak) baseline(a *agent) (usage, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	u, ok := s.base[a]
	return u, ok
}

func (s *soak) noteUsage(a *agent, u usage) {
	s.mu.Lock()
	defer s.mu.Unlock()
	p := s.peak[a]
	p.Goroutines, p.FDs, p.RSS = max(p.Goroutines, u.Goroutines), max(p.FDs, u.FDs), max(p.RSS, u.RSS)
	p.BudgetInUse = max(p.BudgetInUse, u.BudgetInUse)
	p.Devices = max(p.Devices, u.Devices)
	s.peak[a] = p
}
