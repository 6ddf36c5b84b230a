// Command ferry moves the live-migration state of VFIO devices between
// hosts. One binary, several roles:
//
//	ferry dest     run the destination agent (DestAgent + Transfer)
//	ferry source   run the source agent (SourceAgent)
//	ferry migrate  drive one migration between two agents, as a control plane would
//	ferry demo     run both agents in this process and migrate simulated devices
//	ferry devices  list the devices an agent serves
//
// Run `ferry <command> -h` for a command's flags.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"syscall"
)

// exitError carries a process exit code.
type exitError struct {
	code int
	err  error
}

func (e *exitError) Error() string { return e.err.Error() }
func (e *exitError) Unwrap() error { return e.err }

type command struct {
	name    string
	summary string
	run     func(ctx context.Context, args []string, stdout, stderr io.Writer) error
}

func commands() []command {
	return []command{
		{"agent", "run the source and the destination agent in one process (what the DaemonSet runs)", runAgent},
		{"dest", "run the destination agent", runDest},
		{"source", "run the source agent", runSource},
		{"migrate", "drive one migration between a source and a destination agent", runMigrate},
		{"demo", "migrate simulated devices between two agents in this process", runDemo},
		{"devices", "list the devices an agent serves", runDevices},
		{"bench", "measure a migration against raw TCP on loopback, in the same run", runBench},
	}
}

func usage(w io.Writer) {
	fmt.Fprintln(w, "usage: ferry <command> [flags]")
	fmt.Fprintln(w)
	fmt.Fprintln(w, "commands:")
	for _, c := range commands() {
		fmt.Fprintf(w, "  %-9s %s\n", c.name, c.summary)
	}
	fmt.Fprintln(w)
	fmt.Fprintln(w, "Run 'ferry <command> -h' for its flags.")
}

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	code := run(ctx, os.Args[1:], os.Stdout, os.Stderr)
	stop()
	os.Exit(code)
}

func run(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 || args[0] == "help" || args[0] == "-h" || args[0] == "--help" {
		usage(stdout)
		if len(args) == 0 {
			return 2
		}
		return 0
	}
	for _, c := range commands() {
		if c.name != args[0] {
			continue
		}
		err := c.run(ctx, args[1:], stdout, stderr)
		if err == nil {
			return 0
		}
		if errors.Is(err, flag.ErrHelp) {
			return 0
		}
		var ee *exitError
		if errors.As(err, &ee) {
			if ee.err != nil && ee.err.Error() != "" {
				fmt.Fprintf(stderr, "ferry %s: %v\n", c.name, ee.err)
			}
			return ee.code
		}
		fmt.Fprintf(stderr, "ferry %s: %v\n", c.name, err)
		return 1
	}
	fmt.Fprintf(stderr, "ferry: unknown command %q\n\n", args[0])
	usage(stderr)
	return 2
}
