package main

import (
	"crypto/x509"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"strings"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"

	ferryv1 "github.com/vfio-ferry/ferry/api/proto/ferry/v1"
	"github.com/vfio-ferry/ferry/pkg/vfio"
	"github.com/vfio-ferry/ferry/services/chunkwire"
	"github.com/vfio-ferry/ferry/services/grpcserver"
	"github.com/vfio-ferry/ferry/services/peerauth"
)

// securityFlags are an agent's transport, authorization and device
// allowlist flags (docs/security.md):
//
//	--tls-cert, --tls-key, --tls-ca   mutual TLS on the listener and to peers
//	--insecure                        plaintext instead (loopback, tests, demos)
//	--allow-client NAME               who may call SourceAgent and DestAgent
//	--allow-peer NAME                 which source agents may call Transfer
//	--devices PATTERN                 the host devices the agent serves
//
// An agent refuses to start without either TLS or --insecure.
type securityFlags struct {
	tls          peerauth.TLSFiles
	reload       time.Duration
	insecure     bool
	allowClients csvListFlag
	allowPeers   csvListFlag
	devices      csvListFlag
	reflection   bool
	// servesTransfer: the command serves Transfer and takes --allow-peer.
	servesTransfer bool
}

func (f *securityFlags) register(fs *flag.FlagSet, servesTransfer bool) {
	f.servesTransfer = servesTransfer
	fs.StringVar(&f.tls.Cert, "tls-cert", "", "PEM certificate chain of this agent, served to clients and presented to peers (needs serverAuth and clientAuth usages and a SAN)")
	fs.StringVar(&f.tls.Key, "tls-key", "", "PEM private key of --tls-cert")
	fs.StringVar(&f.tls.CA, "tls-ca", "", "PEM CA bundle that signs every client and peer certificate (mutual TLS, TLS 1.3)")
	fs.DurationVar(&f.reload, "tls-reload-interval", peerauth.DefaultReloadInterval, "how often --tls-cert, --tls-key and --tls-ca are read again: a change (a rotated certificate, a Kubernetes Secret update) is used for new connections, running migrations go on; a change that does not parse is logged and the old credentials stay (0: never)")
	fs.BoolVar(&f.insecure, "insecure", false, "serve and dial plaintext gRPC (no TLS, no authorization): for loopback, tests and demos only")
	fs.Var(&f.allowClients, "allow-client", "a client identity (certificate SAN: DNS name, IP, or URI such as spiffe://...) that may call the control-plane API; repeat or comma-separate; \"*\" admits any certificate the CA signed")
	if servesTransfer {
		fs.Var(&f.allowPeers, "allow-peer", "a source agent identity (certificate SAN) that may call Transfer; repeat or comma-separate; \"*\" admits any certificate the CA signed")
	}
	fs.Var(&f.devices, "devices", "host devices this agent serves: a glob over pci: and mdev: specs (pci:0000:3b:*, mdev:*, or * for all); repeat or comma-separate; none: no host device")
	fs.BoolVar(&f.reflection, "reflection", true, "serve gRPC reflection (the schema, for grpcurl)")
}

// check validates the combination of flags.
func (f *securityFlags) check() error {
	for _, p := range f.devices {
		if err := vfio.ValidateDevicePattern(p); err != nil {
			return fmt.Errorf("--devices: %w", err)
		}
	}
	if err := peerauth.ValidateAllowed("--allow-client", f.allowClients); err != nil {
		return err
	}
	if err := peerauth.ValidateAllowed("--allow-peer", f.allowPeers); err != nil {
		return err
	}
	switch {
	case f.insecure && f.tls.Configured():
		return errors.New("--insecure and --tls-cert/--tls-key/--tls-ca exclude each other")
	case f.insecure && (len(f.allowClients) > 0 || len(f.allowPeers) > 0):
		return errors.New("--allow-client and --allow-peer need TLS: a plaintext caller has no identity to check (drop --insecure and give --tls-cert, --tls-key and --tls-ca)")
	case f.insecure:
		return nil
	case !f.tls.Configured():
		return errors.New("no transport security configured: give --tls-cert, --tls-key and --tls-ca for mutual TLS, or --insecure for plaintext gRPC (loopback, tests and demos only)")
	case f.tls.Cert == "" || f.tls.Key == "" || f.tls.CA == "":
		return errors.New("mutual TLS needs all of --tls-cert, --tls-key and --tls-ca")
	case len(f.allowClients) == 0:
		return errors.New("with TLS, --allow-client is required: the client identities (certificate SANs) that may call the control-plane API (--allow-client '*' admits any certificate the CA signed)")
	case f.servesTransfer && len(f.allowPeers) == 0:
		return errors.New("with TLS, --allow-peer is required: the source agent identities (certificate SANs) that may call Transfer (--allow-peer '*' admits any certificate the CA signed)")
	}
	return nil
}

// transport returns the credentials of the agent's listener and those it
// dials peer agents with, and with TLS the reloader they read the files
// through (nil on plaintext).
func (f *securityFlags) transport(log *slog.Logger) (server, client credentials.TransportCredentials, r *peerauth.Reloader, err error) {
	if err := f.check(); err != nil {
		return nil, nil, nil, err
	}
	if f.insecure {
		return insecure.NewCredentials(), insecure.NewCredentials(), nil, nil
	}
	if f.reload < 0 {
		return nil, nil, nil, errors.New("--tls-reload-interval must not be negative")
	}
	r, err = peerauth.NewReloader(f.tls, log, x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth)
	if err != nil {
		return nil, nil, nil, err
	}
	server, client = r.AgentCreds()
	return server, client, r, nil
}

// access is the authorization of the agent's server: nil (none) on
// plaintext.
func (f *securityFlags) access() []peerauth.AccessRule {
	if f.insecure {
		return nil
	}
	return []peerauth.AccessRule{
		{
			Services: []string{ferryv1.SourceAgent_ServiceDesc.ServiceName, ferryv1.DestAgent_ServiceDesc.ServiceName},
			Allow:    f.allowClients,
			Flag:     "--allow-client",
		},
		{
			Services: []string{ferryv1.Transfer_ServiceDesc.ServiceName},
			Allow:    f.allowPeers,
			Flag:     "--allow-peer",
		},
	}
}

// registry returns the device registry's options.
func (f *securityFlags) registry(allowSim bool) vfio.RegistryOptions {
	return vfio.RegistryOptions{AllowSim: allowSim, Devices: f.devices}
}

// logSummary logs what the agent admits, once at start.
func (f *securityFlags) logSummary(log *slog.Logger, allowSim bool) {
	transport := "mutual TLS 1.3"
	if f.insecure {
		transport = "PLAINTEXT (--insecure): no encryption, no authentication, no authorization"
		log.Warn("serving plaintext gRPC", "transport", transport)
	}
	log.Info("security", "transport", transport, "allow_client", []string(f.allowClients), "allow_peer", []string(f.allowPeers),
		"devices", []string(f.devices), "allow_sim", allowSim, "reflection", f.reflection)
	if len(f.devices) == 0 && !allowSim {
		log.Warn("no --devices pattern and no --allow-sim: every device request will be refused")
	}
}

// clientSecurityFlags are the transport flags of a control-plane client
// command (ferry migrate, ferry devices): its client certificate, or
// --insecure.
type clientSecurityFlags struct {
	tls        peerauth.TLSFiles
	insecure   bool
	serverName string
}

func (f *clientSecurityFlags) register(fs *flag.FlagSet) {
	fs.StringVar(&f.tls.Cert, "tls-cert", "", "PEM client certificate (its SAN must be in the agents' --allow-client)")
	fs.StringVar(&f.tls.Key, "tls-key", "", "PEM private key of --tls-cert")
	fs.StringVar(&f.tls.CA, "tls-ca", "", "PEM CA bundle the agents' certificates are verified against")
	fs.StringVar(&f.serverName, "tls-server-name", "", "verify the agents' certificates for this name instead of the host in their address")
	fs.BoolVar(&f.insecure, "insecure", false, "plaintext gRPC (no TLS), for agents started with --insecure")
}

func (f *clientSecurityFlags) creds() (credentials.TransportCredentials, error) {
	c, _, err := f.reloadingCreds(nil)
	return c, err
}

// reloadingCreds are the client's credentials and, with TLS, the
// reloader they read the files through (nil on plaintext): a long
// `ferry migrate` uses a rotated client certificate for its next
// connection when the caller runs the reloader's Watch.
func (f *clientSecurityFlags) reloadingCreds(log *slog.Logger) (credentials.TransportCredentials, *peerauth.Reloader, error) {
	switch {
	case f.insecure && (f.tls.Configured() || f.serverName != ""):
		return nil, nil, errors.New("--insecure and --tls-* exclude each other")
	case f.insecure:
		return insecure.NewCredentials(), nil, nil
	case !f.tls.Configured():
		return nil, nil, errors.New("no transport security configured: give --tls-cert, --tls-key and --tls-ca (mutual TLS), or --insecure for agents that serve plaintext")
	}
	r, err := peerauth.NewReloader(f.tls, log, x509.ExtKeyUsageClientAuth)
	if err != nil {
		return nil, nil, err
	}
	return r.ClientCreds(f.serverName), r, nil
}

// csvListFlag collects a flag given several times, each value a
// comma-separated list (so one environment variable can carry a list:
// --devices=$(FERRY_DEVICES)). Empty items are dropped.
type csvListFlag []string

func (l *csvListFlag) String() string { return strings.Join(*l, ",") }
func (l *csvListFlag) Set(v string) error {
	for _, item := range strings.Split(v, ",") {
		if item = strings.TrimSpace(item); item != "" {
			*l = append(*l, item)
		}
	}
	return nil
}

// dial opens a client connection to the agent at addr with the flags'
// credentials; creds is nil and err a usage error when the flags do not
// make sense.
func (f *clientSecurityFlags) dial(addr string) (*grpc.ClientConn, credentials.TransportCredentials, error) {
	creds, err := f.creds()
	if err != nil {
		return nil, nil, usageError(err)
	}
	conn, err := grpc.NewClient(addr, grpcserver.DialOptions(creds, chunkwire.NewPool())...)
	if err != nil {
		return nil, nil, fmt.Errorf("agent %s: %w", addr, err)
	}
	return conn, creds, nil
}
