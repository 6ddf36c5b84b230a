package wire

import (
	"context"
	"errors"
	"fmt"

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// ErrorDomain is the google.rpc.ErrorInfo domain of every Ferry error.
const ErrorDomain = "ferry.v1"

// Reasons carried in google.rpc.ErrorInfo. They are part of the API:
// control planes switch on them.
const (
	ReasonInvalidArgument   = "INVALID_ARGUMENT"
	ReasonMigrationNotFound = "MIGRATION_NOT_FOUND"
	ReasonSpecMismatch      = "MIGRATION_SPEC_MISMATCH"
	ReasonDeviceNotFound    = "DEVICE_NOT_FOUND"
	ReasonDeviceBusy        = "DEVICE_BUSY"
	ReasonDeviceNotAllowed  = "DEVICE_NOT_ALLOWED"
	ReasonDeviceUnsupported = "DEVICE_MIGRATION_UNSUPPORTED"
	ReasonDeviceState       = "DEVICE_STATE_ERROR"
	ReasonBudgetExhausted   = "MEMORY_BUDGET_EXHAUSTED"
	ReasonBadToken          = "BAD_TOKEN"
	ReasonSessionNotFound   = "SESSION_NOT_FOUND"
	ReasonSessionState      = "SESSION_STATE"
	ReasonBadChunk          = "BAD_CHUNK"
	ReasonChunkCRC          = "CHUNK_CRC_MISMATCH"
	ReasonOutsideWindow     = "CHUNK_OUTSIDE_WINDOW"
	ReasonStreamGap         = "STREAM_GAP"
	ReasonDigestMismatch    = "STREAM_DIGEST_MISMATCH"
	ReasonStreamLength      = "STREAM_LENGTH_MISMATCH"
	ReasonVerifyFailed      = "DEVICE_VERIFY_FAILED"
	ReasonNotReady          = "DESTINATION_NOT_READY"
	// ReasonInitialDataPending: a pre-copy destination has not loaded
	// every device's initial data, so it refuses an unforced switchover.
	ReasonInitialDataPending = "INITIAL_DATA_PENDING"
	// ReasonNotConverged: pre-copy ran to its timeout without the
	// predicted downtime meeting the limit (or without a switchover).
	ReasonNotConverged       = "PRECOPY_NOT_CONVERGED"
	ReasonAborted            = "MIGRATION_ABORTED"
	ReasonCancelled          = "MIGRATION_CANCELLED"
	ReasonPeerUnavailable    = "PEER_UNAVAILABLE"
	ReasonNotImplemented     = "NOT_IMPLEMENTED"
	ReasonInternal           = "INTERNAL"
	ReasonSourceDeviceFailed = "SOURCE_DEVICE_FAILED"
	ReasonDraining           = "AGENT_DRAINING"
	// A device did not answer an operation within the device timeout.
	ReasonDeviceStuck = "DEVICE_STUCK"
	// The source devices stayed stopped past the switchover deadline
	// without a verdict, and were rolled back.
	ReasonSwitchoverDeadline = "SWITCHOVER_DEADLINE"
	// The migration committed (the source has the verified verdict): it
	// can no longer be cancelled or aborted.
	ReasonCommitted = "MIGRATION_COMMITTED"
	// The destination rolled the migration back (a CancelIncoming or an
	// Abort reached it while VERIFIED) before the source's Commit: its
	// devices were reset, so the source rolls back too.
	ReasonRolledBack = "MIGRATION_ROLLED_BACK"
	// The VMM that lent a device (vmm: specs) took it back, or its VMM
	// socket connection closed, while a migration held it.
	ReasonWithdrawn = "DEVICE_WITHDRAWN"
	// Version skew: the peer lacks a protocol feature the migration
	// needs (the message names it), or a device pair cannot carry state
	// from one to the other (the message names the field that differs).
	ReasonFeatureNotSupported = "FEATURE_NOT_SUPPORTED"
	ReasonIncompatibleDevice  = "INCOMPATIBLE_DEVICE"
	// Security: who may call (see authz.go) and who may use a session.
	ReasonUnauthenticated  = "UNAUTHENTICATED"
	ReasonClientNotAllowed = "CLIENT_NOT_ALLOWED"
	ReasonPeerMismatch     = "SESSION_PEER_MISMATCH"
	ReasonBadWindow        = "BAD_WINDOW_UPDATE"

	// Messages gRPC refused before Ferry read them (services/grpcserver):
	// one larger than the agent's limit (RESOURCE_EXHAUSTED), and one
	// that is not a valid message of the method's type or not validly
	// framed or compressed (INVALID_ARGUMENT).
	ReasonMessageTooLarge  = "MESSAGE_TOO_LARGE"
	ReasonMalformedMessage = "MALFORMED_MESSAGE"
)

// Errorf returns a gRPC status error with code and one ErrorInfo carrying
// reason.
func Errorf(code codes.Code, reason, format string, args ...any) error {
	st := status.New(code, fmt.Sprintf(format, args...))
	if d, err := st.WithDetails(&errdetails.ErrorInfo{Reason: reason, Domain: ErrorDomain}); err == nil {
		st = d
	}
	return st.Err()
}

// Reason returns the ErrorInfo reason of a status error, or "".
func Reason(err error) string {
	st, ok := status.FromError(err)
	if !ok {
		return ""
	}
	for _, d := range st.Details() {
		if info, ok := d.(*errdetails.ErrorInfo); ok {
			return info.GetReason()
		}
	}
	return ""
}

// Code returns the gRPC code of err: its status code, CANCELED or
// DEADLINE_EXCEEDED for context errors, UNKNOWN otherwise.
func Code(err error) codes.Code {
	if err == nil {
		return codes.OK
	}
	if st, ok := status.FromError(err); ok {
		return st.Code()
	}
	switch {
	case errors.Is(err, context.Canceled):
		return codes.Canceled
	case errors.Is(err, context.DeadlineExceeded):
		return codes.DeadlineExceeded
	}
	return codes.Unknown
}

// Message returns the status message of err, or err.Error().
func Message(err error) string {
	if st, ok := status.FromError(err); ok {
		return st.Message()
	}
	return err.Error()
}
