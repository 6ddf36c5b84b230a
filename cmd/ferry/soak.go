package main

import (
	"context"
	"crypto/rand"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"os"
	"time"

	"github.com/vfio-ferry/ferry/internal/soak"
)

// runSoak is `ferry soak` (internal/soak): the flags, and this binary for
// the agents the soak starts.
func runSoak(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := newFlagSet("soak", stderr, "[--migrations N] [--seed S] [--duration D] [--concurrency K] [--fault-probability P] [--log-dir DIR] [--json]")
	migrations := fs.Int("migrations", 100, "migrations to run (0: until --duration)")
	seed := fs.Uint64("seed", 0, "the seed every parameter and fault is drawn from (0: a random one, printed)")
	duration := fs.Duration("duration", 0, "start no round after this long (0: no limit)")
	concurrency := fs.Int("concurrency", 4, "the most migrations at once (1-16)")
	faults := fs.Float64("fault-probability", 0.5, "the chance a migration has one fault, or two (0-1)")
	logDir := fs.String("log-dir", "", "keep the agents' logs here (default: a temporary directory, kept only after a violation)")
	asJSON := fs.Bool("json", false, "print the report as JSON")
	if err := parse(fs, args); err != nil {
		return err
	}
	if *seed == 0 {
		var b [8]byte
		rand.Read(b[:])
		*seed = binary.LittleEndian.Uint64(b[:]) >> 1
	}
	exe, err := os.Executable()
	if err != nil {
		return err
	}
	if *migrations == 0 && *duration == 0 {
		return usageError(errors.New("--migrations 0 needs --duration"))
	}
	fmt.Fprintf(stderr, "ferry soak: seed %d\n", *seed)
	cfg := soak.Config{Exe: exe, Seed: *seed, Migrations: *migrations, Duration: *duration, Concurrency: *concurrency,
		FaultProbability: *faults, LogDir: *logDir, Progress: stderr}
	began := time.Now()
	rep, err := soak.Run(ctx, cfg)
	if rep == nil {
		return err
	}
	if *asJSON {
		if jerr := rep.WriteJSON(stdout); jerr != nil {
			return jerr
		}
	} else {
		rep.WriteText(stdout)
	}
	if err != nil {
		if errors.Is(err, soak.ErrViolation) {
			return &exitError{code: 1, err: fmt.Errorf("%v (after %v)", err, time.Since(began).Round(time.Second))}
		}
		return err
	}
	return nil
}
