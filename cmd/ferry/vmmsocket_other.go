//go:build !linux

package main

import (
	"context"
	"errors"
	"log/slog"

	"github.com/vfio-ferry/ferry/pkg/vfio"
)

func serveVMMSocket(context.Context, *vmmSocketFlags, *vfio.Registry, *slog.Logger) (func(), error) {
	return nil, errors.New("--vmm-socket: VFIO and its VMM socket need Linux")
}
