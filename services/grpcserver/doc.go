// Package grpcserver sets up the gRPC side of an agent: the server both
// agents serve on and the dial options of a client that talks to one.
//
// [New] builds a server from a [Config]: the chunk codec of package
// chunkwire (with its Pool as gRPC's buffer pool, so received chunks are
// never copied), message limits, keepalives, the interceptor chain (metrics,
// call logging, the authorization of package peerauth, panic recovery),
// health and, unless turned off, reflection. Register the agent's
// services on the [Server] (a grpc.ServiceRegistrar), which translates the
// messages gRPC refuses before Ferry sees them, too large or malformed,
// into errors with an ErrorInfo reason (MESSAGE_TOO_LARGE,
// MALFORMED_MESSAGE); then call [Server.Ready]. [Server.Stop] ends it
// gracefully within a context. [DialOptions] are the matching client
// options: the same codec, pool, limits and keepalives.
package grpcserver
