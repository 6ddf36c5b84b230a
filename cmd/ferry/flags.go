package main

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"strings"
	"time"

	ferryv1 "github.com/vfio-ferry/ferry/api/proto/ferry/v1"
	"github.com/vfio-ferry/ferry/pkg/size"
)

// sizeFlag is a byte size flag ("256MiB", "1GiB", "4096").
type sizeFlag uint64

func (s *sizeFlag) String() string { return size.Format(uint64(*s)) }
func (s *sizeFlag) Set(v string) error {
	n, err := size.Parse(v)
	if err != nil {
		return err
	}
	*s = sizeFlag(n)
	return nil
}

// rateFlag is a rate flag in bytes per second ("8MB/s", "1MiB/s").
type rateFlag uint64

func (r *rateFlag) String() string { return size.FormatRate(float64(*r)) }
func (r *rateFlag) Set(v string) error {
	n, err := size.ParseRate(v)
	if err != nil {
		return err
	}
	*r = rateFlag(n)
	return nil
}

// flagsSet is the names of the flags the command line set.
func flagsSet(fs *flag.FlagSet) map[string]bool {
	set := map[string]bool{}
	fs.Visit(func(f *flag.Flag) { set[f.Name] = true })
	return set
}

// listFlag collects a repeated flag.
type listFlag []string

func (l *listFlag) String() string     { return strings.Join(*l, ",") }
func (l *listFlag) Set(v string) error { *l = append(*l, v); return nil }

// newFlagSet returns a flag set that reports errors instead of exiting.
// Its Usage, printed for -h, is the synopsis and every flag.
func newFlagSet(name string, stderr io.Writer, synopsis string) *flag.FlagSet {
	fs := flag.NewFlagSet("ferry "+name, flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() {
		fmt.Fprintf(fs.Output(), "usage: ferry %s %s\n\nflags:\n", name, synopsis)
		fs.PrintDefaults()
	}
	return fs
}

// parse parses args, which must all be flags. -h prints the command's
// help and returns flag.ErrHelp; an error in args is a usage error (exit
// code 2, the error and then a hint to the help, not the help itself).
func parse(fs *flag.FlagSet, args []string) error {
	rest, err := parseArgs(fs, args)
	if err == nil && len(rest) > 0 {
		err = usageError(fmt.Errorf("unexpected argument %q", rest[0]))
	}
	return err
}

// parseArgs is parse for a command that takes arguments: they may come
// before, between or after the flags ("--" ends the flags), and are
// returned in order.
func parseArgs(fs *flag.FlagSet, args []string) ([]string, error) {
	full, out := fs.Usage, fs.Output()
	// The flag package prints the error and the whole help itself on a
	// bad flag: quiet it and let run print the error once.
	fs.Usage = func() {}
	fs.SetOutput(io.Discard)
	defer func() {
		fs.Usage = full
		fs.SetOutput(out)
	}()
	var rest []string
	for {
		err := fs.Parse(args)
		switch {
		case errors.Is(err, flag.ErrHelp):
			fs.SetOutput(out)
			full()
			return nil, err
		case err != nil:
			return nil, usageError(err)
		}
		left := fs.Args()
		if len(left) == 0 {
			return rest, nil
		}
		if len(args) > len(left) && args[len(args)-len(left)-1] == "--" {
			// Everything after "--" is an argument.
			return append(rest, left...), nil
		}
		rest = append(rest, left[0])
		args = left[1:]
	}
}

// logFlags are the logging flags every long-running command takes.
type logFlags struct {
	format string
	level  string
}

func (l *logFlags) register(fs *flag.FlagSet) {
	fs.StringVar(&l.format, "log-format", "auto", "log format: text, json, or auto (text on a terminal, else json)")
	fs.StringVar(&l.level, "log-level", "info", "log level: debug, info, warn, error")
}

func (l *logFlags) logger(w io.Writer) (*slog.Logger, error) {
	var level slog.Level
	if err := level.UnmarshalText([]byte(l.level)); err != nil {
		return nil, fmt.Errorf("--log-level: %w", err)
	}
	opts := &slog.HandlerOptions{Level: level}
	switch l.format {
	case "text":
		return slog.New(slog.NewTextHandler(w, opts)), nil
	case "json":
		return slog.New(slog.NewJSONHandler(w, opts)), nil
	case "auto":
		if isTerminal(w) {
			return slog.New(slog.NewTextHandler(w, opts)), nil
		}
		return slog.New(slog.NewJSONHandler(w, opts)), nil
	}
	return nil, fmt.Errorf("--log-format %q: want text, json or auto", l.format)
}

// isTerminal reports whether w is a character device (a terminal).
func isTerminal(w io.Writer) bool {
	f, ok := w.(*os.File)
	if !ok {
		return false
	}
	st, err := f.Stat()
	return err == nil && st.Mode()&os.ModeCharDevice != 0
}

// precopyFlags are the pre-copy limits `ferry migrate` and `ferry demo`
// take; they go with --mode precopy only.
type precopyFlags struct {
	fs             *flag.FlagSet
	downtimeLimit  time.Duration
	precopyTimeout time.Duration
	onTimeout      string
}

func (f *precopyFlags) register(fs *flag.FlagSet) {
	f.fs = fs
	fs.DurationVar(&f.downtimeLimit, "downtime-limit", 0, "pre-copy: switch over by itself once the destination is READY and the predicted downtime is at most this (default: only on 'ferry switchover')")
	fs.DurationVar(&f.precopyTimeout, "precopy-timeout", 0, "pre-copy: the longest pre-copy may run before --on-timeout applies (default: the source agent's, 10m)")
	fs.StringVar(&f.onTimeout, "on-timeout", "fail", "pre-copy: at --precopy-timeout, fail (roll back; the VM never stopped) or switchover (forced, whether or not the destination is READY)")
}

// apply checks the flags against the mode and sets them in p.
func (f *precopyFlags) apply(mode string, p *plan) error {
	set := flagsSet(f.fs)
	for _, name := range []string{"downtime-limit", "precopy-timeout", "on-timeout"} {
		if set[name] && mode != "precopy" {
			return fmt.Errorf("--%s needs --mode precopy", name)
		}
	}
	switch {
	case set["downtime-limit"] && f.downtimeLimit <= 0:
		return errors.New("--downtime-limit must be above 0")
	case set["precopy-timeout"] && f.precopyTimeout <= 0:
		return errors.New("--precopy-timeout must be above 0")
	}
	switch f.onTimeout {
	case "fail":
		p.onTimeout = ferryv1.PrecopyTimeoutAction_PRECOPY_TIMEOUT_ACTION_FAIL
	case "switchover":
		p.onTimeout = ferryv1.PrecopyTimeoutAction_PRECOPY_TIMEOUT_ACTION_SWITCHOVER
	default:
		return fmt.Errorf("--on-timeout %q: want fail or switchover", f.onTimeout)
	}
	if mode != "precopy" {
		p.onTimeout = ferryv1.PrecopyTimeoutAction_PRECOPY_TIMEOUT_ACTION_UNSPECIFIED
	}
	p.precopy = mode == "precopy"
	p.downtimeLimit, p.precopyTimeout = f.downtimeLimit, f.precopyTimeout
	return nil
}

// pairFlags are the agents and device pairs of a migration, as `ferry
// migrate` and `ferry preflight` take them.
type pairFlags struct {
	source, dest *string
	src, dst     listFlag
}

func (f *pairFlags) register(fs *flag.FlagSet) {
	f.source = fs.String("source", "", "the source agent's address (host:port)")
	f.dest = fs.String("dest", "", "the destination agent's address (host:port)")
	fs.Var(&f.src, "src-device", "a source device spec (repeat; pairs with --dest-device in order)")
	fs.Var(&f.dst, "dest-device", "a destination device spec (repeat)")
}

// check says what is missing, as a usage error.
func (f *pairFlags) check() error {
	switch {
	case *f.source == "" || *f.dest == "":
		return usageError(errors.New("--source and --dest are required"))
	case len(f.src) == 0 || len(f.src) != len(f.dst):
		return usageError(fmt.Errorf("give one --dest-device per --src-device (got %d and %d)", len(f.src), len(f.dst)))
	}
	return nil
}
