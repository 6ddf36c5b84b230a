// Package shapedlink gives tests and benchmarks a real network between
// two agents on one machine: two network namespaces of their own, joined
// by a veth pair, with an address each from a private test range
// (10.213.0.0/16, inside those namespaces only: the host's own namespace
// gets no address and no route), and every direction of the pair shaped
// by a tbf qdisc to a rate. Nothing of the host's network changes.
//
// A Link is made by New (or, in a test, ForTest, which skips the test
// when it cannot be made and removes it with t.Cleanup) and removed by
// Close, which deletes the two namespaces and with them the veth pair and
// its qdiscs. Names are unique per process and per link
// (NamePrefix, the process id, a counter), so parallel tests and
// parallel test binaries do not meet; Sweep removes the namespaces a
// process that no longer runs left behind (a test binary that was
// killed), and New sweeps before it creates.
//
// What runs on the link:
//
//   - Processes: Namespace.Command runs a program inside a namespace
//     (`ip netns exec NAME ...`), as the agents are run there. It
//     listens on the namespace's Addr; the other namespace reaches it
//     over the shaped pair.
//   - This process's own sockets: Namespace.DialContext and
//     Namespace.Listen open a socket inside the namespace (the calling
//     goroutine's thread joins it for the socket call only). A test's
//     control plane dials the agents with DialContext; a benchmark's raw
//     TCP arm listens in one namespace and dials from the other, so its
//     bytes cross the same shaped pair as the agents'.
//
// The kernel must have network namespaces, veth and the tbf qdisc, and
// the caller must be root (CAP_NET_ADMIN and CAP_SYS_ADMIN); New returns
// an error wrapping ErrUnsupported otherwise. tbf shapes the rate only:
// a delay, where a test wants one, comes from a TCP proxy of its own
// (test/tcpproxy), since the kernels this runs on may lack netem.
package shapedlink
