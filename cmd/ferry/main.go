// Command ferry moves the live-migration state of VFIO devices between
// hosts. One binary, several roles:
//
//	ferry dest     run the destination agent (DestAgent + Transfer)
//	ferry source   run the source agent (SourceAgent)
//	ferry migrate  drive one migration between two agents, as a control plane would
//	ferry preflight  ask whether its device pairs are compatible, before any device stops
//	ferry demo     run both agents in this process and migrate simulated devices
//	ferry devices  list the devices an agent serves
//	ferry release  give a device that rests after a migration back to its host
//	ferry vmm      lend a device to an agent as a VMM does (attach, detach, watch)
//	ferry bench    measure a migration against raw TCP on loopback
//	ferry migrations list|get|watch|cancel   the migrations an agent holds
//	ferry version  print the build
//	ferry soak     run many migrations under random faults and check nothing is lost
//
// Run `ferry help <command>` for a command's flags.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"strings"
	"syscall"
)

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
		{"preflight", "ask whether a migration's device pairs are compatible, before any device stops", runPreflight},
		{"demo", "migrate simulated devices between two agents in this process", runDemo},
		{"devices", "list the devices an agent serves", runDevices},
		{"bandwidth", "change a running migration's bandwidth limit, or lift it", runBandwidth},
		{"switchover", "switch a pre-copy migration over: its devices stop and the rest of their state streams", runSwitchover},
		{"release", "give a source device back to its host after a migration (STOP or ERROR to RUNNING, or a reset)", runRelease},
		{"vmm", "speak an agent's VMM socket as a VMM: attach a device's fd, detach it, watch it", runVMM},
		{"migrations", "list, get, watch or cancel the migrations an agent holds", runMigrations},
		{"bench", "measure a migration against raw TCP on loopback, in the same run", runBench},
		{"version", "print the build (version, revision, Go)", runVersion},
		{"soak", "run many migrations between real agents under random faults, checking every invariant after each", runSoak},
	}
}

func usage(w io.Writer) {
	fmt.Fprintln(w, "usage: ferry <command> [flags]")
	fmt.Fprintln(w)
	fmt.Fprintln(w, "commands:")
	for _, c := range commands() {
		fmt.Fprintf(w, "  %-10s %s\n", c.name, c.summary)
	}
	fmt.Fprintln(w)
	fmt.Fprintln(w, "Run 'ferry help <command>' for its flags.")
}

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	code := run(ctx, os.Args[1:], os.Stdout, os.Stderr)
	stop()
	os.Exit(code)
}

func lookup(name string) (command, bool) {
	for _, c := range commands() {
		if c.name == name {
			return c, true
		}
	}
	return command{}, false
}

// run runs the command line args and returns the exit code: 0, 1 when
// the command failed, 2 for an error in the command line. `ferry help CMD`
// prints CMD's help on stdout. An error is printed on stderr, followed,
// when it is in the command line, by a hint to the command's help (not the
// whole help); with --json it is also printed on stdout as a JSON object
// (code, reason, message), so a caller that reads stdout sees it.
func run(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 {
		usage(stderr)
		return 2
	}
	if args[0] == "-h" || args[0] == "--help" || (args[0] == "help" && len(args) == 1) {
		usage(stdout)
		return 0
	}
	if args[0] == "help" {
		c, ok := lookup(args[1])
		if !ok || len(args) > 2 {
			fmt.Fprintf(stderr, "ferry help: unknown command %q\nrun 'ferry help' for the commands\n", strings.Join(args[1:], " "))
			return 2
		}
		// The command prints its own help, here on stdout: it was asked for.
		if err := c.run(ctx, []string{"-h"}, stdout, stdout); err != nil && !errors.Is(err, flag.ErrHelp) {
			fmt.Fprintf(stderr, "ferry help %s: %v\n", c.name, err)
			return 1
		}
		return 0
	}
	c, ok := lookup(args[0])
	if !ok {
		fmt.Fprintf(stderr, "ferry: unknown command %q\nrun 'ferry help' for the commands\n", args[0])
		return 2
	}
	err := c.run(ctx, args[1:], stdout, stderr)
	if err == nil || errors.Is(err, flag.ErrHelp) {
		return 0
	}
	code := 1
	var ee *exitError
	if errors.As(err, &ee) {
		code = ee.code
	}
	if err.Error() == "" {
		// The command has said everything (a result that did not verify).
		return code
	}
	fmt.Fprintf(stderr, "ferry %s: %v\n", c.name, err)
	if ee != nil && ee.usage {
		fmt.Fprintf(stderr, "run 'ferry help %s' for its flags\n", c.name)
	}
	if wantsJSON(args[1:]) {
		printJSONError(stdout, err)
	}
	return code
}
