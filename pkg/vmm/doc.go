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
// with length at most MaxFrame (1 MiB of config state and 64 KiB more).
// The VMM sends ferry.vmm.v1.Request (api/proto/ferry/vmm/v1/vmm.proto);
// the agent sends ferry.vmm.v1.AgentMessage, which is either a Reply,
// answering each Request with its id, in order, or an Event of a device
// the connection lent or watches, whenever the device changes. Ids are
// the VMM's choice; a Reply of id 0 with an error that answers no
// request is the agent refusing the connection (a peer not allowed, a
// frame it cannot read), and the agent closes the socket after it.
//
// The requests: Attach{name, config_state} (with the device's
// descriptor), UpdateConfig{name, config_state}, Detach{name},
// Watch{name} and FetchConfig{name} (the config state a destination
// migration delivered, in Reply.config_state). Errors carry a gRPC code
// and one of Ferry's reasons (Reply.error), as the agents' API does:
// VMM_FD_NOT_VFIO_DEVICE, VMM_CONFIG_TOO_LARGE, VMM_CONFIG_FROZEN,
// VMM_PEER_NOT_ALLOWED, VMM_BAD_FRAME, DEVICE_BUSY (the name is taken),
// DEVICE_NOT_FOUND, DEVICE_MIGRATION_UNSUPPORTED. Event carries the
// device's state (numbered as the kernel's enum vfio_device_mig_state,
// and by name), the migration holding it, the config state once a
// destination delivered it, withdrawn on the last one, and missed: how
// many events the agent dropped before it because the VMM read too
// slowly. services/vmmsock documents what the agent does with each.
//
// A file descriptor travels
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
// A VMM owns its descriptor throughout: the agent works on a duplicate,
// so if the agent dies mid-migration the VMM still holds the device, in
// whatever state it was left (STOP_COPY, STOP, RESUMING), and Recover
// returns it to RUNNING by the VMM's own descriptor.
//
// This package holds the framing (Conn), the peer check (PeerCred,
// Allow), the descriptor check (CheckVFIODevice), and the client a VMM
// written in Go uses (Dial, Client, Recover).
package vmm
