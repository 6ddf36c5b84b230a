package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"time"

	vmmv1 "github.com/vfio-ferry/ferry/api/proto/ferry/vmm/v1"
	"github.com/vfio-ferry/ferry/pkg/vfio"
	"github.com/vfio-ferry/ferry/pkg/vmm"
)

// vmmHelp is what `ferry help vmm` says.
const vmmHelp = `usage: ferry vmm attach|detach|watch FLAGS

  attach --socket PATH --name NAME --open pci:ADDR|mdev:UUID [--config-file FILE] [--config-out FILE] [--exit-on-config] [--recover]
         open the device as a VMM does (through its VFIO group) and lend its fd to the agent as vmm:NAME,
         printing every event, until interrupted or the agent goes away
  detach --socket PATH --name NAME   take a lent device back (a migration holding it is rolled back first)
  watch  --socket PATH --name NAME   print a lent device's events until it is withdrawn

'ferry vmm SUBCOMMAND -h' shows a subcommand's flags.
`

// runVMM speaks an agent's VMM socket as a VMM would: `ferry vmm attach`
// opens a device itself (as QEMU does: through its group) and lends its
// descriptor to the agent, `detach` takes a device back, `watch` prints
// a lent device's events.
func runVMM(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	if len(args) == 0 {
		return usageError(errors.New("want a subcommand: attach, detach or watch"))
	}
	switch args[0] {
	case "-h", "-help", "--help", "help":
		fmt.Fprint(stderr, vmmHelp)
		return flag.ErrHelp
	case "attach":
		return runVMMAttach(ctx, args[1:], stdout, stderr)
	case "detach":
		return runVMMDetach(ctx, args[1:], stdout, stderr)
	case "watch":
		return runVMMWatch(ctx, args[1:], stdout, stderr)
	}
	return usageError(fmt.Errorf("unknown subcommand %q: want attach, detach or watch", args[0]))
}

// runVMMAttach opens --open as a VMM does and lends it over the socket
// until interrupted, or until the agent goes away, printing every event.
func runVMMAttach(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := newFlagSet("vmm attach", stderr, "--socket PATH --name NAME --open pci:ADDR|mdev:UUID [--config-file FILE] [--config-out FILE] [--exit-on-config] [--recover]")
	socket := fs.String("socket", "", "the agent's VMM socket (its --vmm-socket)")
	name := fs.String("name", "", "the name to lend the device under: specs then name it vmm:NAME")
	open := fs.String("open", "", "the device to open and lend, as a VMM holds it (through its VFIO group)")
	configFile := fs.String("config-file", "", "the VMM's config state of the device to attach (at most 1 MiB)")
	configOut := fs.String("config-out", "", "write the config state a destination migration delivers to this file")
	exitOnConfig := fs.Bool("exit-on-config", false, "detach and exit once a destination migration delivered the device and its config state")
	recoverDev := fs.Bool("recover", false, "when the agent goes away, return the device to RUNNING by this process's own descriptor (what a source VMM does if the agent died mid-migration)")
	if err := parse(fs, args); err != nil {
		return err
	}
	if *socket == "" || *name == "" || *open == "" {
		return usageError(errors.New("--socket, --name and --open are required"))
	}
	var config []byte
	if *configFile != "" {
		b, err := os.ReadFile(*configFile)
		if err != nil {
			return err
		}
		config = b
	}
	spec, err := vfio.ParseSpec(*open)
	if err != nil {
		return usageError(err)
	}
	dev, err := vfio.Open(spec)
	if err != nil {
		return err
	}
	defer dev.Close()
	f, err := vfio.DeviceFD(dev)
	if err != nil {
		return err
	}
	defer f.Close()

	cl, err := vmm.Dial(ctx, *socket)
	if err != nil {
		return err
	}
	defer cl.Close()
	if err := cl.Attach(ctx, *name, f, config); err != nil {
		return err
	}
	fmt.Fprintf(stdout, "attached %s as vmm:%s (%d bytes of config state)\n", spec, *name, len(config))

	agentGone := false
loop:
	for {
		select {
		case ev, ok := <-cl.Events():
			if !ok {
				agentGone = true
				break loop
			}
			printEvent(stdout, ev)
			if ev.GetConfigReceived() {
				if *configOut != "" {
					if err := os.WriteFile(*configOut, ev.GetConfigState(), 0o600); err != nil {
						return err
					}
				}
				if *exitOnConfig {
					break loop
				}
			}
			if ev.GetWithdrawn() {
				break loop
			}
		case <-ctx.Done():
			break loop
		}
	}
	if agentGone {
		fmt.Fprintf(stdout, "agent went away: %v\n", cl.Err())
		if *recoverDev {
			before, after, err := vmm.Recover(f)
			if err != nil {
				return fmt.Errorf("recover vmm:%s: %w", *name, err)
			}
			fmt.Fprintf(stdout, "recovered by own fd: %v -> %v\n", before, after)
		}
	} else {
		dctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), time.Minute)
		err := cl.Detach(dctx, *name)
		cancel()
		if err != nil {
			return fmt.Errorf("detach vmm:%s: %w", *name, err)
		}
	}
	st, err := dev.State()
	if err != nil {
		return err
	}
	fmt.Fprintf(stdout, "own fd state: %v\n", st)
	return nil
}

func printEvent(w io.Writer, ev *vmmv1.Event) {
	line := fmt.Sprintf("event vmm:%s state=%s", ev.GetName(), ev.GetStateName())
	if id := ev.GetMigrationId(); id != "" {
		line += " migration=" + id
	}
	if ev.GetConfigReceived() {
		line += fmt.Sprintf(" config_received=%d", len(ev.GetConfigState()))
	}
	if ev.GetWithdrawn() {
		line += " withdrawn"
	}
	if n := ev.GetMissed(); n > 0 {
		line += fmt.Sprintf(" missed=%d", n)
	}
	fmt.Fprintln(w, line)
}

// dialNamed parses the --socket and --name flags of a subcommand that
// acts on one lent device, and connects to the socket.
func dialNamed(ctx context.Context, sub string, args []string, stderr io.Writer) (*vmm.Client, string, error) {
	fs := newFlagSet("vmm "+sub, stderr, "--socket PATH --name NAME")
	socket := fs.String("socket", "", "the agent's VMM socket")
	name := fs.String("name", "", "the device's name (vmm:NAME)")
	if err := parse(fs, args); err != nil {
		return nil, "", err
	}
	if *socket == "" || *name == "" {
		return nil, "", usageError(errors.New("--socket and --name are required"))
	}
	cl, err := vmm.Dial(ctx, *socket)
	return cl, *name, err
}

func runVMMDetach(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	cl, name, err := dialNamed(ctx, "detach", args, stderr)
	if err != nil {
		return err
	}
	defer cl.Close()
	if err := cl.Detach(ctx, name); err != nil {
		return err
	}
	fmt.Fprintf(stdout, "detached vmm:%s\n", name)
	return nil
}

func runVMMWatch(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	cl, name, err := dialNamed(ctx, "watch", args, stderr)
	if err != nil {
		return err
	}
	defer cl.Close()
	if err := cl.Watch(ctx, name); err != nil {
		return err
	}
	for {
		select {
		case ev, ok := <-cl.Events():
			if !ok {
				return cl.Err()
			}
			printEvent(stdout, ev)
			if ev.GetWithdrawn() {
				return nil
			}
		case <-ctx.Done():
			return nil
		}
	}
}
