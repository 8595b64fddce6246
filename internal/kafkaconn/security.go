package kafkaconn

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"strings"
	"time"

	"github.com/segmentio/kafka-go"
	"github.com/segmentio/kafka-go/sasl"
	"github.com/segmentio/kafka-go/sasl/plain"
	"github.com/segmentio/kafka-go/sasl/scram"

	"github.com/tollgate-dev/tollgate/internal/deadline"
	"github.com/tollgate-dev/tollgate/internal/tlsclient"
)

// The SASL mechanisms Settings accepts, as brokers name them.
const (
	SASLPlain       = "PLAIN"
	SASLScramSHA256 = "SCRAM-SHA-256"
	SASLScramSHA512 = "SCRAM-SHA-512"
)

// Settings say how to reach the brokers securely, as an operator writes
// them: TLS, and SASL authentication, each optional. The zero value is
// plaintext without authentication, a local broker's way.
type Settings struct {
	// TLS encrypts every connection to the brokers and checks their
	// certificates against CAFile (the system's roots when empty).
	TLS bool
	// CAFile is a PEM file of the certificate authorities the brokers'
	// certificates must chain to.
	CAFile string
	// CertFile and KeyFile are a client certificate and its key (PEM),
	// for brokers that authenticate clients by certificate (mutual TLS).
	CertFile, KeyFile string
	// ServerName is the name the brokers' certificates must carry, when
	// it is not the host a broker is dialed at.
	ServerName string
	// SASLMechanism is PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512; empty for
	// none.
	SASLMechanism string
	// SASLUsername and SASLPassword are the credentials SASL presents.
	SASLUsername, SASLPassword string
}

// Security is what the Kafka clients are built with: nil fields mean
// plaintext and no authentication.
type Security struct {
	TLS  *tls.Config
	SASL sasl.Mechanism
}

// Build checks s and loads its files. Every problem is reported, each
// naming its setting under prefix (the configuration's key for it).
func (s Settings) Build(prefix string) (Security, error) {
	var sec Security
	var errs []error
	c, err := tlsclient.Files{Enabled: s.TLS, CAFile: s.CAFile, CertFile: s.CertFile, KeyFile: s.KeyFile, ServerName: s.ServerName}.Config(prefix)
	if err != nil {
		errs = append(errs, err)
	}
	sec.TLS = c
	mech := strings.ToUpper(strings.TrimSpace(s.SASLMechanism))
	credentials := s.SASLUsername != "" || s.SASLPassword != ""
	switch {
	case mech == "" && credentials:
		errs = append(errs, fmt.Errorf("%ssasl_mechanism: SASL credentials are given without a mechanism; want %s, %s or %s", prefix, SASLPlain, SASLScramSHA256, SASLScramSHA512))
	case mech == "":
	case mech != SASLPlain && mech != SASLScramSHA256 && mech != SASLScramSHA512:
		errs = append(errs, fmt.Errorf("%ssasl_mechanism: %q is not one Tollgate speaks; want %s, %s or %s", prefix, s.SASLMechanism, SASLPlain, SASLScramSHA256, SASLScramSHA512))
	case s.SASLUsername == "" || s.SASLPassword == "":
		errs = append(errs, fmt.Errorf("%ssasl_username and %ssasl_password: %s needs both", prefix, prefix, mech))
	case mech == SASLPlain:
		sec.SASL = plain.Mechanism{Username: s.SASLUsername, Password: s.SASLPassword}
	default:
		algo := scram.SHA256
		if mech == SASLScramSHA512 {
			algo = scram.SHA512
		}
		m, err := scram.Mechanism(algo, s.SASLUsername, s.SASLPassword)
		if err != nil {
			errs = append(errs, fmt.Errorf("%ssasl_username and %ssasl_password: %w", prefix, prefix, err))
		}
		sec.SASL = m
	}
	if err := errors.Join(errs...); err != nil {
		return Security{}, err
	}
	return sec, nil
}

// PlainSASLInClear reports whether s sends a SASL PLAIN password without
// TLS, where anyone on the path reads it.
func (s Settings) PlainSASLInClear() bool {
	return !s.TLS && strings.EqualFold(strings.TrimSpace(s.SASLMechanism), SASLPlain)
}

// Transport is a kafka-go transport for writers and clients.
func (sec Security) Transport() *kafka.Transport {
	return &kafka.Transport{Dial: (&net.Dialer{Timeout: 3 * time.Second}).DialContext, TLS: sec.TLS, SASL: sec.SASL}
}

// Dialer is a kafka-go dialer for single connections (DialContext,
// DialLeader).
func (sec Security) Dialer(timeout time.Duration) *kafka.Dialer {
	return &kafka.Dialer{Timeout: timeout, TLS: sec.TLS, SASLMechanism: sec.SASL}
}

// ReaderDialer is a kafka-go dialer for readers. kafka-go's reader moves its
// connection's read deadline for every message of a fetch, to the same
// instant each time (deadline.Lazy keeps those moves from costing a timer
// update each), and reads the connection through a bufio.Reader of 4 KiB,
// so a fetch answer of many small records cost one system call for every
// 4 KiB: about 7 % of the ingest process's CPU on the ingest benchmark.
// Through ReadAhead one read takes what the socket holds, up to
// ReadAheadBytes. TLS, when set, runs over the read-ahead connection.
func (sec Security) ReaderDialer(timeout time.Duration) *kafka.Dialer {
	d := sec.Dialer(timeout)
	d.DialFunc = func(ctx context.Context, network, addr string) (net.Conn, error) {
		var nd net.Dialer
		c, err := nd.DialContext(ctx, network, addr)
		if err != nil {
			return nil, err
		}
		return ReadAhead(deadline.Lazy(c)), nil
	}
	return d
}
