// Package vfio drives the live-migration uAPI (protocol v2) of VFIO
// devices: it moves a device through the kernel's migration states and
// hands out the data stream that carries the device's internal state. It
// knows nothing of the network, gRPC or protos; the agents build the
// migration on top of it.
//
// # Devices and specs
//
// A device is named by a spec string, parsed by ParseSpec:
//
//	pci:0000:3b:00.2                           a VFIO-bound PCI function
//	mdev:83b8f4f2-509f-382f-3c1e-e6bfe0fa1001  a mediated device
//	sim:size=1GiB,seed=7,rate=2GB/s            the simulated device (SimConfig)
//	sim:size=4GiB,flags=stopcopy|p2p|precopy,precopy=4GiB,dirty=32MB/s
//	                                           one that pre-copies
//	vmm:vm42-nic0                              a device a VMM lent (Registry.Lend)
//
// Spec.String is the canonical form: lowercase hex, sim keys in a fixed
// order, sizes printed exactly, defaults left out. Two strings name the
// same device exactly when their canonical forms are equal; compare and
// store specs in that form.
//
// Every device implements Device. Open returns the kernel's device for pci:
// and mdev: specs (ioctls on a VFIO device fd, in the *_linux.go files;
// other systems get ErrNotSupported) and a SimDevice for sim: specs. Agents do
// not call Open themselves: a Registry opens devices on first use, keeps
// them open across migrations so their state can be observed afterwards,
// gives each to one owner at a time (Acquire and its release func), and
// opens sim: specs only with RegistryOptions.AllowSim. A vmm: spec is
// never opened: it names a device a VMM holds and lent to the agent
// (Registry.Lend, with AdoptDeviceFD making a Device of the descriptor it
// passed), which the registry hands out like the others, reports to the
// VMM's watch, takes back on Registry.Withdraw (evicting the migration
// that holds it, RegistryOptions.Evict) and never resets or closes but
// for its own duplicate of the descriptor. Registry.LetGo closes an idle
// device the registry opened, so another process can open it.
//
// # States and arcs
//
// The states are the kernel's (State, numbered as enum
// vfio_device_mig_state). Which ones a device supports follows its
// migration flags (Flags.Supports): STOP, RUNNING, STOP_COPY and RESUMING
// need FlagStopCopy, RUNNING_P2P adds FlagP2P, PRE_COPY adds FlagPreCopy,
// PRE_COPY_P2P needs all three. ERROR is never supported: it cannot be
// requested and is left only by a device reset, which lands in RUNNING.
//
// Drivers implement only single arcs (STOP -> STOP_COPY, RUNNING_P2P ->
// STOP, ...). A request for a state further away is walked one arc at a
// time, exactly as the kernel's vfio_mig_get_next_state computes it:
// NextState is that function (with the ERROR guard of the 2026 fix) and
// Path the whole walk, so Path(FlagStopCopy|FlagP2P, StateRunning,
// StateStopCopy) is RUNNING_P2P, STOP, STOP_COPY. Refused requests wrap
// ErrInvalidTransition (the kernel's EINVAL): unsupported targets, ERROR
// at either end, and STOP_COPY -> PRE_COPY(_P2P), which some kernels loop
// on forever; never request it. When a SetState fails midway the device
// may rest on any state of the path, or in ERROR: read it back with
// State, then recover to RUNNING, or Reset when that fails too.
//
// # Data streams
//
// Four single arcs open a data stream, the kernel's data_fd (OpensStream):
// STOP -> STOP_COPY and RUNNING(_P2P) -> PRE_COPY(_P2P) open a saving
// stream to read, STOP -> RESUMING a resuming stream to write. SetState
// returns the stream when its last arc opens one, and nil otherwise.
// PRE_COPY <-> PRE_COPY_P2P -> STOP_COPY keep the saving stream; leaving
// the saving or resuming states ends it (EndsStream), and so do a reset
// and Close. After the end, reads and writes fail with ErrStreamEnded (the
// kernel's ENODEV); a new STOP -> STOP_COPY opens a fresh stream from the
// start of the state.
//
// Reads of a saving stream in STOP_COPY return io.EOF once the whole state
// was read, and forever after: read to io.EOF before leaving STOP_COPY. In
// PRE_COPY(_P2P) a read fails with ErrNoData (the kernel's ENOMSG) when
// nothing is new, and io.EOF (a read of 0, as mtty answers) means the
// same: read again later, or move on to STOP_COPY, where the same stream
// carries the rest. Never request STOP_COPY -> PRE_COPY.
//
// Saving streams in PRE_COPY(_P2P) answer VFIO_MIG_GET_PRECOPY_INFO
// through the optional PrecopyInfoer: InitialBytes (the initial data not
// yet read, counting down), DirtyBytes (the estimate of state rewritten
// since it was read) and Reinit (new initial data appeared and
// InitialBytes was reset). Elsewhere it fails with ErrNotPreCopy. The
// kernel backend opts a PRE_COPY device in to
// VFIO_DEVICE_FEATURE_MIG_PRECOPY_INFOv2 at open, which makes Reinit
// reportable; where the kernel lacks it Reinit is always false. A
// resuming
// stream accepts any chunking of the saved stream, in order; the device
// validates what it got at RESUMING -> STOP, which fails with ErrVerify on
// an incomplete or foreign stream and leaves the device in RESUMING until
// a reset.
//
// The caller owns each stream it gets and must Close it. As with a
// kernel data_fd, closing the handle does not end the session: what was
// written still counts at RESUMING -> STOP.
//
// # The simulated device
//
// SimDevice is as strict as a kernel driver, so two processes that share
// no memory can prove a migration bit-exact. Its state is a function of
// (seed, offset): little-endian 64-bit words of a Weyl sequence mixed by
// one multiply (incompressible: zstd cannot shrink it), with a "zero"
// fraction of 4 KiB pages all zero, chosen by a hash of (seed, page). A
// saving stream produces it at several GB/s a core; a resuming device
// compares every byte written with its own state at the same speed,
// rejects writes past its size (ErrStreamTooLong, the kernel's ENOMEM),
// and fails RESUMING -> STOP naming the first wrong byte or the short
// length. "rate" and "wrate" cap the read and write rates, "fault"
// makes reads fail (ErrInjectedFault) at a byte offset, and "flags"
// chooses the migration flags (default stopcopy|p2p).
//
// "hang" makes one operation block, as a driver that never answers
// would, until the device is closed (so tests and processes clean up;
// the call then fails with fs.ErrClosed):
//
//	hang=read@64MiB        the read that starts at byte 64 MiB of a saving stream
//	hang=write@0           the write that starts at byte 0 of a resuming stream
//	hang=state:STOP_COPY   the arc into STOP_COPY (the arcs before it are taken)
//	hang=reset             a reset
//
// A read or write first delivers the bytes before the offset. "fail"
// makes operations fail with ErrInjectedFault:
//
//	fail=state:RUNNING        the arc into RUNNING fails and the device enters ERROR
//	fail=reset                Reset fails and leaves the state alone
//	fail=state:RUNNING|reset  both
//
// State names are the kernel's, in either case; the state must be one
// the flags support, and not ERROR.
//
// # The simulated device's pre-copy
//
// With flags including precopy the device supports the PRE_COPY states
// and models a device that runs while it is saved:
//
//	precopy=SIZE     its initial data: the first SIZE bytes of the state
//	                 (rounded up to 4 KiB pages), read in PRE_COPY
//	dirty=RATE       while in PRE_COPY(_P2P) it rewrites 4 KiB pages of its
//	                 state at RATE, on the clock (time.Now: tests use
//	                 testing/synctest); a page rewritten after it was read
//	                 is sent again
//	reinit=OFFSET    once the initial data was read up to OFFSET (at most
//	                 the precopy size; at it, with the next read), new
//	                 initial data appears: the whole state is rewritten,
//	                 InitialBytes starts again and Reinit is reported once
//	datasize=none    DataSize fails, as a kernel without MIG_DATA_SIZE
//	precopyinfo=v1   answer PrecopyInfo as a kernel without PRECOPY_INFOv2:
//	                 Reinit is never reported (default v2)
//
// Its streams then carry records, so later bytes can overwrite earlier
// ones: each record is a 24-byte header of little-endian uint64s
// (offset, length, generation) and length bytes of whole pages at that
// generation; the last record is a trailer (offset 2^64-1, length 16,
// generation 0; the number of dirty events and the reinit epoch). In
// PRE_COPY the stream carries the initial data in order, then the pages
// dirtied since they were read; PRE_COPY -> STOP_COPY continues it with
// the pages not yet sent and the dirty ones, then the trailer, then
// io.EOF. PrecopyInfo follows the kernel's rules: InitialBytes counts the
// initial pages not yet read (record headers left out), DirtyBytes the
// dirty pages pending, and both are zero exactly when a read fails with
// ErrNoData. The resuming instance checks every byte against the page's
// content at the record's generation and, at RESUMING -> STOP, that every
// page holds the generation the source had when STOP_COPY ended: a
// stream that lost a record or its trailer fails with ErrVerify. That
// check costs the dirty events, not the pages (a real device's STOP is
// quick, and the downtime should not measure the simulator): counts kept
// as records apply say every page is at or above the epoch and the
// rewrites add up to the events, and a fingerprint (the sum of
// generation times an odd per-page hash) compared with the events'
// replay says they rewrote the same pages. Without
// precopy in the flags, streams are the raw state, byte for byte as
// before.
//
// # Devices that do not answer
//
// Device methods take no context: an ioctl cannot be cancelled. A
// GuardedDevice (Guard) bounds them instead with the device timeout
// (DefaultOpTimeout, 10s; RegistryOptions.OpTimeout): a control operation
// that does not answer in time fails with ErrStuck naming it ("SET_STATE
// to STOP_COPY did not answer within 10s"); a read or write of a data
// stream runs inline on its caller's goroutine (no hand-off, no
// allocation) and a watchdog marks the device stuck when one has run for
// the timeout. While stuck, every operation fails at once with ErrStuck
// and State answers the state last known; the mark clears when the
// operation returns at last. A guarded stream over one that answers
// PrecopyInfo answers it too, as a control operation ("PRECOPY_INFO")
// under the timeout: it is an ioctl that may hang, polled between reads. Consumers find out through StuckReporter,
// which every device a Registry hands out implements:
//
//	if sr, ok := dev.(vfio.StuckReporter); ok {
//		select {
//		case <-sr.Stuck(): // give up on the reader blocked in Read
//		case err := <-readerDone:
//		}
//	}
//
// # Who owns what
//
// A Device is driven by one owner at a time: SetState, Reset and Close
// must not race each other (the SimDevice tolerates it, the kernel's
// device does not promise to), while reads and writes on its stream, State
// and DataSize may run beside them. The Registry owns the devices it opens
// and closes them in Registry.Close; an owner gives a device back with
// its release func and never closes it. A device released while stuck
// stays with the registry (owner OwnerStuck) until its operation
// answers; an owner that gives up on it asks its guard to settle it then
// (GuardedDevice.WhenAnswered: a source returns it to RUNNING, a
// destination resets it), and a device so returned to RUNNING is free
// again, any other closed. Registry.List and ListAll answer from what
// the registry remembers, never opening a device or waiting on one;
// Registry.Recover gives an idle device back in RUNNING (ErrBusy when
// someone holds it).
//
// This package is the only one in Ferry that imports unsafe, and only its
// kernel backend (the *_linux.go files) does; pkg/vmm and
// services/vmmsock import golang.org/x/sys/unix too, for sockets.
// The state machine (states.go) is pure: no I/O, no clock, no goroutines.
package vfio
