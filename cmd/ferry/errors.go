package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"strconv"
	"strings"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"

	"github.com/vfio-ferry/ferry/services/wire"
)

// exitError carries a process exit code.
type exitError struct {
	code int
	err  error
	// usage: the error is in the command line; run prints a hint to the
	// command's help after it.
	usage bool
}

func (e *exitError) Error() string {
	if e.err == nil {
		return ""
	}
	return e.err.Error()
}
func (e *exitError) Unwrap() error { return e.err }

// usageError is an error in a command's command line: exit code 2, and
// run prints a hint to the command's help after it.
func usageError(err error) error {
	return &exitError{code: 2, err: err, usage: true}
}

// codeNames are the canonical names of the gRPC codes (google.rpc.Code),
// the one spelling the CLI prints.
var codeNames = [...]string{
	codes.OK:                 "OK",
	codes.Canceled:           "CANCELLED",
	codes.Unknown:            "UNKNOWN",
	codes.InvalidArgument:    "INVALID_ARGUMENT",
	codes.DeadlineExceeded:   "DEADLINE_EXCEEDED",
	codes.NotFound:           "NOT_FOUND",
	codes.AlreadyExists:      "ALREADY_EXISTS",
	codes.PermissionDenied:   "PERMISSION_DENIED",
	codes.ResourceExhausted:  "RESOURCE_EXHAUSTED",
	codes.FailedPrecondition: "FAILED_PRECONDITION",
	codes.Aborted:            "ABORTED",
	codes.OutOfRange:         "OUT_OF_RANGE",
	codes.Unimplemented:      "UNIMPLEMENTED",
	codes.Internal:           "INTERNAL",
	codes.Unavailable:        "UNAVAILABLE",
	codes.DataLoss:           "DATA_LOSS",
	codes.Unauthenticated:    "UNAUTHENTICATED",
}

// codeName is the canonical UPPER_SNAKE name of a gRPC code, as
// google.rpc.Code spells it (DATA_LOSS, FAILED_PRECONDITION).
func codeName(c codes.Code) string {
	if int(c) < len(codeNames) {
		return codeNames[c]
	}
	return fmt.Sprintf("CODE_%d", uint32(c))
}

// callError is a failed RPC of the CLI: what it was doing, and the
// status the agent (or gRPC) answered.
type callError struct {
	op        string
	err       error
	plaintext bool // the CLI dialled without TLS
}

func (e *callError) Error() string { return e.op + ": " + describe(e.err, e.plaintext) }
func (e *callError) Unwrap() error { return e.err }

// newCallError wraps err, the failure of op over a connection with creds.
func newCallError(op string, err error, creds credentials.TransportCredentials) error {
	return &callError{op: op, err: err, plaintext: creds != nil && creds.Info().SecurityProtocol == "insecure"}
}

// describe renders a gRPC error with its code and reason, and what to do
// when the transport security of the two ends does not match.
func describe(err error, plaintext bool) string {
	s := wire.Message(err) + " (" + codeName(wire.Code(err))
	if r := wire.Reason(err); r != "" {
		s += ", " + r
	}
	s += ")"
	if h := transportHint(err, plaintext); h != "" {
		s += ": " + h
	}
	return s
}

// transportHint explains the errors gRPC gives when one end speaks TLS and
// the other does not. gRPC reports them only as UNAVAILABLE with the
// transport's text, so the text is all there is to recognise them by.
func transportHint(err error, plaintext bool) string {
	if wire.Code(err) != codes.Unavailable {
		return ""
	}
	msg := err.Error()
	switch {
	case plaintext && strings.Contains(msg, "error reading server preface"):
		// A TLS server reads the client's plaintext HTTP/2 preface as a
		// bad handshake and closes the connection.
		return "the agent expects TLS: give --tls-cert, --tls-key and --tls-ca instead of --insecure"
	case !plaintext && strings.Contains(msg, "first record does not look like a TLS handshake"):
		return "the agent serves plaintext: give --insecure instead of the --tls-* flags"
	}
	return ""
}

// jsonError is what a command run with --json prints on stdout when it
// fails before it has a result.
type jsonError struct {
	Error resultError `json:"error"`
}

// errorResult renders err as the error of a --json result: the gRPC code
// and reason when it carries them, INVALID_ARGUMENT for a command-line
// error.
func errorResult(err error) resultError {
	var ee *exitError
	if errors.As(err, &ee) && ee.usage {
		return resultError{Code: codeName(codes.InvalidArgument), Message: ee.Error()}
	}
	r := resultError{Code: codeName(wire.Code(err)), Reason: wire.Reason(err), Message: err.Error()}
	var ce *callError
	if errors.As(err, &ce) {
		r.Message = ce.op + ": " + wire.Message(ce.err)
		if h := transportHint(ce.err, ce.plaintext); h != "" {
			r.Message += ": " + h
		}
	}
	return r
}

// printJSONError prints err on w as one JSON object.
func printJSONError(w io.Writer, err error) {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	enc.Encode(jsonError{Error: errorResult(err)})
}

// wantsJSON reports whether a command line asks for --json output (the
// last --json flag before a "--" decides, as the flag package does).
func wantsJSON(args []string) bool {
	want := false
	for _, a := range args {
		if a == "--" {
			break
		}
		if !strings.HasPrefix(a, "-") {
			continue
		}
		name, val, hasVal := strings.Cut(strings.TrimLeft(a, "-"), "=")
		if name != "json" {
			continue
		}
		if !hasVal {
			want = true
		} else if b, err := strconv.ParseBool(val); err == nil {
			want = b
		}
	}
	return want
}
