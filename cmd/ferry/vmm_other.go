//go:build !linux

package main

import (
	"context"
	"errors"
	"io"
)

func runVMM(context.Context, []string, io.Writer, io.Writer) error {
	return errors.New("ferry vmm: VFIO and its VMM socket need Linux")
}
