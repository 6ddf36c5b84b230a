// Package soak is `ferry soak`: a chaos soak that runs many migrations
// through real agent processes on loopback, under random faults, and
// checks after each migration and between rounds that nothing was lost.
// Each fault class has a test of its own (test/e2e/faults_test.go,
// services/*/stuck*); the soak is where they meet: in any phase, two at a
// time, with several migrations at once, hundreds of times, so that what
// a fault leaves behind (a goroutine, an fd, budget held, a device left
// in STOP_COPY or ERROR) shows.
//
// # A command, not a test binary
//
// The soak is a subcommand of the ferry binary, as `ferry bench` is, and
// for the same reasons: the agents it drives are that binary re-executed
// (`ferry dest`, `ferry source`), so what is soaked is exactly what
// ships; its flags are ordinary flags (`go test` would claim -json and
// hide the rest behind -args); and a soak that found something replays
// anywhere the binary runs, from the seed alone, with no Go toolchain.
// The test in this package (run by `make test`) builds the binary and
// runs a short soak through Run, with a fixed seed and a random one.
//
// # What runs
//
// Run starts six agent processes, all with --allow-sim and short fault
// deadlines (2 s reconnect, progress and source timeouts, a 1 s device
// timeout): a source with mutual TLS and one without, and a destination
// for each lane, the four combinations of plaintext or mutual TLS with
// chunks on direct data connections or in gRPC messages. Every
// migration goes through TCP proxies of its own (test/tcpproxy) on a
// loopback address of its own (127.0.0.10 and up, which the agents'
// certificate names): one in front of its destination's gRPC port and,
// on a direct lane, one at the destination's data port, since a source
// dials the data port on the host it reached Transfer at.
//
// The soak runs in rounds. A round draws 1 to Concurrency migrations and
// runs them at once; each draws its lane, 1 to 4 devices from a pool of
// simulated devices (random sizes, a fraction of zero pages, half of
// them pre-copy capable with a dirty rate), 1 to 8 channels, a chunk
// size of 64 KiB to 4 MiB, a window of 1 to 4 chunks, stop-copy or
// pre-copy (switched over once READY), the default digest or SHA-256,
// and with probability FaultProbability one fault or two:
//
//   - channel-cut, all-cut, stall, corrupt: the proxy cuts one channel
//     connection, or every first-generation one, stalls one, or flips a
//     bit, at a random byte of the connection;
//   - dest-restart, source-restart: the agent process is killed with
//     SIGKILL at a random phase or byte count and started again on the
//     same addresses (every migration of the round on it is hit);
//   - slow-dest: the destination device writes at 8 to 32 MB/s;
//   - source-fault: a source device's read fails at an offset, or its
//     arc into STOP_COPY (or PRE_COPY) fails into ERROR;
//   - hang: a source device's read or arc into STOP_COPY, or a
//     destination device's write or arc into STOP, never returns;
//   - cancel: CancelMigration at the source or CancelIncoming at the
//     destination, at a random phase or byte count;
//   - budget: a prepare of 64 device windows, beyond the destination's
//     memory budget, while the migration runs;
//   - rival: another migration asks for one of the migration's devices
//     while it runs, at the source or at the destination.
//
// The pool's devices migrate again and again, as a host's do: after a
// success the soak gives the source devices back (ReleaseDevice), and
// the next prepare takes the destination's from STOP. A device fault
// adds a key to the spec (hang=, fault=, wrate=), which names another
// device of the same content.
//
// # What is checked
//
// After each migration (its watches followed to their end: a view in a
// final phase may come before the destination's clean-up), against both
// agents' RPCs (ListDevices,
// GetMigration/WatchMigration, GetIncoming/WatchIncoming):
// the migration ended SUCCEEDED with every destination device verified
// and in STOP and every source device in STOP, or FAILED / CANCELLED
// with an ErrorInfo reason, every source device back in RUNNING and
// every destination device reset; a prepare or start is refused only
// under a fault that explains it; no device of it left in STOP_COPY,
// RESUMING, PRE_COPY or ERROR, owned, or stuck unless it had a hang; a
// source device a success left in STOP goes back to RUNNING on
// ReleaseDevice; a prepare beyond the budget is refused with
// RESOURCE_EXHAUSTED / MEMORY_BUDGET_EXHAUSTED; a rival for a held device
// is refused with DEVICE_BUSY (or DEVICE_STATE_ERROR, DEVICE_STUCK); and
// no migration waited out its switchover deadline (every fault the soak
// injects ends a migration, or is recovered from, within seconds: one
// that waits the minute was wedged with its devices stopped).
//
// Between rounds, when no migration of the soak runs, for every agent:
// no migration of its own left running; every device idle; the
// destination's budget in use zero; its goroutine count (go_goroutines
// from its metrics page, --metrics-listen), open fds (/proc/PID/fd) and
// RSS (/proc/PID/status) back within a small bound of its baseline (the
// level of the process, idle, after a warm-up migration) within 30 s,
// allowing a watchdog goroutine for each device it opened since (an
// agent keeps every device it opened, and a fault's spec names a new
// one); a leak's goroutine stacks are dumped (SIGQUIT) and summarised;
// no call in its access log ended UNKNOWN (an error that left a handler
// without a gRPC status) and no handler panicked; and, for a race-built
// binary, no data race in its stderr. An agent left
// holding a hung device (whose operation never returns, so its goroutine
// never ends) is restarted after the round; a restarted agent is warmed
// up and measured afresh.
//
// # Stopping and replaying
//
// The soak stops at the first violation and reports the seed, the
// migration's parameters and faults, what the faults saw, and the tail of
// every agent's log (the whole logs stay in the log directory). Every
// parameter and fault is drawn from the seed, so `ferry soak --seed S`
// draws the same migrations in the same rounds; the interleaving of
// concurrent migrations, and so whether a fault at a byte count lands
// before or after another's, is the machine's.
package soak
