// Package tlsclient builds the TLS configuration with which Tollgate's
// processes reach a backing service (Kafka, ClickHouse, Redis), from the
// files an operator names.
package tlsclient

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"os"
)

// Files are one service's TLS settings.
type Files struct {
	// Enabled turns TLS on; the other settings mean nothing without it.
	Enabled bool
	// CAFile is a PEM file of the certificate authorities the service's
	// certificate must chain to (the system's roots when empty).
	CAFile string
	// CertFile and KeyFile are a client certificate and its key (PEM),
	// for a service that authenticates clients by certificate.
	CertFile, KeyFile string
	// ServerName is the name the service's certificate must carry, when
	// it is not the host dialed.
	ServerName string
}

// Config returns the TLS configuration f describes, nil when TLS is off.
// Every problem is reported, each naming its setting: prefix followed by
// tls, tls_ca_file, tls_cert_file, tls_key_file (a configuration's keys,
// as services.redis_tls_ca_file).
func (f Files) Config(prefix string) (*tls.Config, error) {
	var errs []error
	if !f.Enabled {
		if f.CAFile != "" || f.CertFile != "" || f.KeyFile != "" || f.ServerName != "" {
			return nil, fmt.Errorf("%stls: the TLS settings are given but TLS is off; set it to true", prefix)
		}
		return nil, nil
	}
	c := &tls.Config{MinVersion: tls.VersionTLS12, ServerName: f.ServerName}
	if f.CAFile != "" {
		pem, err := os.ReadFile(f.CAFile)
		if err != nil {
			errs = append(errs, fmt.Errorf("%stls_ca_file: %w", prefix, err))
		} else {
			pool := x509.NewCertPool()
			if !pool.AppendCertsFromPEM(pem) {
				errs = append(errs, fmt.Errorf("%stls_ca_file: %s holds no PEM certificate", prefix, f.CAFile))
			}
			c.RootCAs = pool
		}
	}
	switch {
	case (f.CertFile == "") != (f.KeyFile == ""):
		errs = append(errs, fmt.Errorf("%stls_cert_file and %stls_key_file: give both or neither", prefix, prefix))
	case f.CertFile != "":
		cert, err := tls.LoadX509KeyPair(f.CertFile, f.KeyFile)
		if err != nil {
			errs = append(errs, fmt.Errorf("%stls_cert_file and %stls_key_file: %w", prefix, prefix, err))
		} else {
			c.Certificates = []tls.Certificate{cert}
		}
	}
	if err := errors.Join(errs...); err != nil {
		return nil, err
	}
	return c, nil
}
