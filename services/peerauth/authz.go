package peerauth

import (
	"context"
	"fmt"
	"github.com/vfio-ferry/ferry/services/wire"
	"slices"
	"strings"

	"github.com/grpc-ecosystem/go-grpc-middleware/v2/interceptors"
	"github.com/grpc-ecosystem/go-grpc-middleware/v2/interceptors/auth"
	"github.com/grpc-ecosystem/go-grpc-middleware/v2/interceptors/selector"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
)

// AccessRule admits the callers whose certificate names one of Allow to
// the gRPC services listed in Services.
type AccessRule struct {
	// Services are full service names, as in a ServiceDesc
	// ("ferry.v1.Transfer").
	Services []string
	// Allow are client identities, each compared only with the SANs of
	// its kind (see Identity.Matches): an IP address with the IP SANs, a
	// URI (spiffe://...) with the URI SANs exactly, a DNS name with the
	// DNS SANs without regard to case; "*" admits any client whose
	// certificate the CA signed.
	Allow []string
	// Flag names the option that configures the rule (--allow-client),
	// for the refusal's message.
	Flag string
}

// isOpen reports whether service is reachable by any caller the
// transport admitted: health and reflection, which probes and tooling
// need and which reveal nothing but the serving status and the schema.
func isOpen(service string) bool {
	switch service {
	case healthpb.Health_ServiceDesc.ServiceName, "grpc.reflection.v1.ServerReflection", "grpc.reflection.v1alpha.ServerReflection":
		return true
	}
	return false
}

// ValidateAllowed checks a list of identities given on the command line.
func ValidateAllowed(flag string, names []string) error {
	for _, n := range names {
		switch {
		case n == "":
			return fmt.Errorf("%s: an empty identity", flag)
		case strings.ContainsAny(n, " \t\n,"):
			return fmt.Errorf("%s %q: an identity is one certificate SAN (a DNS name, an IP address or a URI such as spiffe://trust.domain/path), without spaces or commas", flag, n)
		case n != "*" && strings.Contains(n, "*"):
			return fmt.Errorf("%s %q: identities are matched exactly; only a lone \"*\" admits every certificate the CA signed", flag, n)
		}
	}
	return nil
}

// Interceptors are the authorization interceptors for rules: one
// auth interceptor per rule, each behind a selector that matches its
// services, then one that refuses every service no rule names (but the
// open ones). Without rules there is no authorization (plaintext agents
// and tests).
func Interceptors(rules []AccessRule) ([]grpc.UnaryServerInterceptor, []grpc.StreamServerInterceptor) {
	if rules == nil {
		return nil, nil
	}
	var unary []grpc.UnaryServerInterceptor
	var stream []grpc.StreamServerInterceptor
	covered := []string{}
	for _, r := range rules {
		covered = append(covered, r.Services...)
		match := selector.MatchFunc(func(_ context.Context, c interceptors.CallMeta) bool {
			return slices.Contains(r.Services, c.Service)
		})
		authz := allowFunc(r)
		unary = append(unary, selector.UnaryServerInterceptor(auth.UnaryServerInterceptor(authz), match))
		stream = append(stream, selector.StreamServerInterceptor(auth.StreamServerInterceptor(authz), match))
	}
	// Fail closed: a service registered without a rule is refused.
	rest := selector.MatchFunc(func(_ context.Context, c interceptors.CallMeta) bool {
		return !isOpen(c.Service) && !slices.Contains(covered, c.Service)
	})
	unary = append(unary, selector.UnaryServerInterceptor(auth.UnaryServerInterceptor(denyUnlisted), rest))
	stream = append(stream, selector.StreamServerInterceptor(auth.StreamServerInterceptor(denyUnlisted), rest))
	return unary, stream
}

// allowFunc admits the identities r allows.
func allowFunc(r AccessRule) auth.AuthFunc {
	return func(ctx context.Context) (context.Context, error) {
		id := PeerIdentity(ctx)
		if !id.Authenticated() {
			return nil, wire.Errorf(codes.Unauthenticated, wire.ReasonUnauthenticated,
				"%s needs a client certificate signed by the agent's CA", method(ctx))
		}
		for _, name := range r.Allow {
			if id.Matches(name) {
				return ctx, nil
			}
		}
		flag := r.Flag
		if flag == "" {
			flag = "the agent's allowlist"
		}
		return nil, wire.Errorf(codes.PermissionDenied, wire.ReasonClientNotAllowed,
			"client %q may not call %s: it is not in %s", id.String(), method(ctx), flag)
	}
}

func denyUnlisted(ctx context.Context) (context.Context, error) {
	return nil, wire.Errorf(codes.PermissionDenied, wire.ReasonClientNotAllowed, "%s is open to no client", method(ctx))
}

func method(ctx context.Context) string {
	if m, ok := grpc.Method(ctx); ok {
		return m
	}
	return "this method"
}
