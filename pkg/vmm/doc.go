// Package vmm speaks the VMM socket of Ferry's agents: the local Unix
// socket (`--vmm-socket PATH`) on which a VMM that holds a VFIO device
// lends it to the agent for a migration, instead of the agent opening it
// (which fails while the VMM holds the group, and would reset a
// vfio-pci function behind the VMM's back).
//
// # The protocol
//
// A stream socket (SOCK_STREAM). Every message, both ways, is a frame:
//
//	uint32 length, little-endian | length bytes of a protobuf message
//
// with length at most MaxFrame. The VMM sends ferry.vmm.v1.Request
// (api/proto/ferry/vmm/v1/vmm.proto) and the agent answers each with a
// ferry.vmm.v1.Reply of the same id, in order. A file descriptor travels
// as SCM_RIGHTS ancillary data sent together with the frame of the
// request that carries it (one sendmsg holding at least the frame's
// first byte). The agent reads each frame in two exact reads (the length,
// then the body), so a descriptor is always matched to its frame; a
// frame that carries descriptors its request does not take has them
// closed and is refused.
//
// A VMM written in C or Rust needs only sendmsg, recvmsg and a protobuf
// encoder for three small messages.
//
// The agent checks each peer with SO_PEERCRED against the uids and gids
// it was told to allow, and refuses a descriptor that is not a VFIO
// device (CheckVFIODevice): nothing a peer sends makes the agent open a
// path.
//
// This package holds the framing (Conn), the peer check (PeerCred) and
// the descriptor check (CheckVFIODevice).
package vmm
