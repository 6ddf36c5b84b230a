package main

import (
	"context"
	"flag"
	"fmt"
	"log/slog"
	"os/user"
	"strconv"
	"strings"

	"github.com/vfio-ferry/ferry/pkg/vfio"
	"github.com/vfio-ferry/ferry/pkg/vmm"
)

// vmmSocketFlags configure an agent's VMM socket (--vmm-socket).
type vmmSocketFlags struct {
	path  string
	group string
	uids  string
	gids  string
}

func (f *vmmSocketFlags) register(fs *flag.FlagSet) {
	fs.StringVar(&f.path, "vmm-socket", "", "serve the VMM socket at this path: VMMs lend their VFIO device fds there (vmm:NAME specs); off when empty")
	fs.StringVar(&f.group, "vmm-socket-group", "", "give the VMM socket this group (name or gid); it is mode 0660")
	fs.StringVar(&f.uids, "vmm-allow-uid", "", "comma-separated uids allowed on the VMM socket (SO_PEERCRED); with --vmm-allow-gid empty too, only the agent's own uid")
	fs.StringVar(&f.gids, "vmm-allow-gid", "", "comma-separated gids allowed on the VMM socket (SO_PEERCRED)")
}

// allow parses the allowed uid and gid lists.
func (f *vmmSocketFlags) allow() (vmm.Allow, error) {
	var a vmm.Allow
	var err error
	if a.UIDs, err = parseIDs("--vmm-allow-uid", f.uids); err != nil {
		return a, err
	}
	a.GIDs, err = parseIDs("--vmm-allow-gid", f.gids)
	return a, err
}

// gid resolves --vmm-socket-group; -1 when unset.
func (f *vmmSocketFlags) gid() (int, error) {
	if f.group == "" {
		return -1, nil
	}
	if n, err := strconv.ParseUint(f.group, 10, 32); err == nil {
		return int(n), nil
	}
	g, err := user.LookupGroup(f.group)
	if err != nil {
		return -1, fmt.Errorf("--vmm-socket-group %q: %w", f.group, err)
	}
	n, err := strconv.Atoi(g.Gid)
	if err != nil {
		return -1, fmt.Errorf("--vmm-socket-group %q: gid %q: %w", f.group, g.Gid, err)
	}
	return n, nil
}

func parseIDs(flagName, s string) ([]uint32, error) {
	var ids []uint32
	for part := range strings.SplitSeq(s, ",") {
		if part = strings.TrimSpace(part); part == "" {
			continue
		}
		n, err := strconv.ParseUint(part, 10, 32)
		if err != nil {
			return nil, fmt.Errorf("%s: %q is not a numeric id", flagName, part)
		}
		ids = append(ids, uint32(n))
	}
	return ids, nil
}

// evicter is an agent that cancels its migration holding a withdrawn
// device (source.Agent.Evict, dest.Agent.Evict).
type evicter interface {
	Evict(owner, spec string, why error) bool
}

// evictors routes a registry's evictions to the agents of this process,
// which are made after the registry.
type evictors struct {
	agents []evicter
	log    *slog.Logger
}

func (e *evictors) evict(owner, spec string, why error) {
	for _, a := range e.agents {
		if a.Evict(owner, spec, why) {
			return
		}
	}
	e.log.Warn("withdrawn device held by no migration of this agent", "owner", owner, "device", spec)
}

// startVMMSocket serves the VMM socket when --vmm-socket is set, lending
// to reg; stop ends it (withdrawing every lent device) and waits.
func startVMMSocket(ctx context.Context, f *vmmSocketFlags, reg *vfio.Registry, log *slog.Logger) (stop func(), err error) {
	if f.path == "" {
		if f.group != "" || f.uids != "" || f.gids != "" {
			return nil, fmt.Errorf("--vmm-socket-group, --vmm-allow-uid and --vmm-allow-gid need --vmm-socket")
		}
		return func() {}, nil
	}
	return serveVMMSocket(ctx, f, reg, log)
}
