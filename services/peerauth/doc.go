// Package peerauth is how Ferry's agents know each other and their
// clients: mutual TLS, the identity of a caller, and which identities may
// call which service.
//
// [ServerTLS], [ClientTLS] and [AgentTLS] build the mutual-TLS
// configurations (TLS 1.3, client certificates required and verified)
// from the files of [TLSFiles]; each refuses, with the flag to fix, a
// certificate without SANs, without the extended key usage its side
// needs, or already expired. [PeerIdentity] is a caller's identity: the
// SANs of its verified certificate, matched by kind ([Identity.Matches]).
// [Interceptors] authorize each call by that identity with
// go-grpc-middleware's auth and selector interceptors, one per
// [AccessRule]; health and reflection stay open, a service no rule names
// is closed, and the refusals carry the reasons UNAUTHENTICATED and
// CLIENT_NOT_ALLOWED. [LogRefusedHandshakes] logs, once per connection,
// a client the TLS handshake turned away. docs/security.md has the threat
// model.
package peerauth
