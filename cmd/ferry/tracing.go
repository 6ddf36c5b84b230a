package main

import (
	"context"
	"fmt"
	"io"
	"time"

	"github.com/vfio-ferry/ferry/internal/tracing"
)

// shutdownTracing sends the spans still buffered, for a few seconds at
// most: a collector that is down must not hold the command's exit.
func shutdownTracing(tr *tracing.Tracing, stderr io.Writer) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := tr.Shutdown(ctx); err != nil {
		fmt.Fprintf(stderr, "ferry: sending the traces: %v\n", err)
	}
}
