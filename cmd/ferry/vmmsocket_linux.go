package main

import (
	"context"
	"log/slog"
	"sync"

	"github.com/vfio-ferry/ferry/pkg/vfio"
	"github.com/vfio-ferry/ferry/services/vmmsock"
)

func serveVMMSocket(ctx context.Context, f *vmmSocketFlags, reg *vfio.Registry, log *slog.Logger) (func(), error) {
	allow, err := f.allow()
	if err != nil {
		return nil, err
	}
	gid, err := f.gid()
	if err != nil {
		return nil, err
	}
	ln, err := vmmsock.Listen(f.path, gid)
	if err != nil {
		return nil, err
	}
	srv := vmmsock.NewServer(vmmsock.Options{Lender: reg, Allow: allow, Logger: log.With("component", "vmm-socket")})
	ctx, cancel := context.WithCancel(context.WithoutCancel(ctx))
	var wg sync.WaitGroup
	wg.Go(func() {
		if err := srv.Serve(ctx, ln); err != nil {
			log.Error("vmm socket", "err", err)
		}
	})
	log.Info("vmm socket", "path", f.path, "allow_uids", allow.UIDs, "allow_gids", allow.GIDs)
	return func() { cancel(); wg.Wait() }, nil
}
