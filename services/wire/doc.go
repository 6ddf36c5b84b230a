// Package wire is the contract both Ferry agents speak, kept in one place
// so the source and the destination meet only through it: the error
// reasons and their translation, the limits every request is checked
// against, the window checks, the final phases, the metadata of a Channel
// stream, the migration watch and the refusal of a draining agent. How
// the chunk bytes travel is package chunkwire, TLS and authorization
// package peerauth, the gRPC server and dial set-up package grpcserver.
//
// # Errors
//
// [Errorf] builds a status with a code and a google.rpc.ErrorInfo reason
// (the Reason constants, domain [ErrorDomain]); [Reason], [Code] and
// [Message] read them back. Each agent translates its domain errors once,
// at its gRPC edge.
//
// # Limits and validation
//
// The limit constants bound what a peer or a control plane may ask for
// (ids, specs, tokens, devices, channels, chunk sizes, windows, messages);
// [ValidateID], [ValidateSpecLength], [ValidateDeviceCount], [Channels]
// and [ChunkSize] check a request against them before anything is
// allocated for it. [CheckWindowUpdate] and [CheckOpenWindows] check the
// destination's windows against what the source has sent ([Frontier]).
//
// # Migrations
//
// [Final] says whether a phase ends a migration. [HeaderSession] and
// [HeaderChannel] bind a Channel stream to its session and channel.
// [Broadcast] and [Watch] serve a migration watch: a snapshot at once, on
// every phase change, and every [WatchInterval] while bytes move, until
// the migration is final. [ErrDraining] refuses a
// new migration on an agent shutting down; [WaitDone] and [CountOpen]
// wait for and count the migrations it still runs.
package wire
