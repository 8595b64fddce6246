package testenv

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"os"
	"testing"
	"time"

	"github.com/segmentio/kafka-go"
	"github.com/segmentio/kafka-go/sasl"
	"github.com/segmentio/kafka-go/sasl/plain"
	"github.com/segmentio/kafka-go/sasl/scram"
)

func TestPrivateSecureKafkaServesTLSAndSASL(t *testing.T) {
	k := PrivateSecureKafka(t)
	// The CA file is what a client configured by path reads.
	caPEM, err := os.ReadFile(k.CAFile)
	Must(t, err, "read the CA file")
	roots := x509.NewCertPool()
	if !roots.AppendCertsFromPEM(caPEM) {
		t.Fatalf("no certificate in %s", k.CAFile)
	}
	trusted := &tls.Config{RootCAs: roots, MinVersion: tls.VersionTLS12}

	mechanisms := []struct {
		name string
		make func(user, password string) (sasl.Mechanism, error)
	}{
		{"PLAIN", func(u, p string) (sasl.Mechanism, error) { return plain.Mechanism{Username: u, Password: p}, nil }},
		{"SCRAM-SHA-256", func(u, p string) (sasl.Mechanism, error) { return scram.Mechanism(scram.SHA256, u, p) }},
		{"SCRAM-SHA-512", func(u, p string) (sasl.Mechanism, error) { return scram.Mechanism(scram.SHA512, u, p) }},
	}
	for _, m := range mechanisms {
		t.Run(m.name+" creates a topic, produces and consumes over TLS", func(t *testing.T) {
			mech, err := m.make(k.User, k.Password)
			Must(t, err, "SASL mechanism")
			roundTrip(t, k.Addr, trusted, mech)
		})
	}

	for _, m := range mechanisms {
		t.Run(m.name+" with a wrong password fails to authenticate", func(t *testing.T) {
			mech, err := m.make(k.User, k.Password+"-wrong")
			Must(t, err, "SASL mechanism")
			err = dial(t, k.Addr, trusted, mech)
			if err == nil {
				t.Fatal("a wrong password logged in")
			}
			if !errors.Is(err, kafka.SASLAuthenticationFailed) {
				t.Fatalf("want SASL authentication failed, got %T: %v", err, err)
			}
		})
	}

	t.Run("a client that does not trust the CA fails the TLS handshake", func(t *testing.T) {
		mech, err := scram.Mechanism(scram.SHA512, k.User, k.Password)
		Must(t, err, "SASL mechanism")
		// The system's roots: the broker's CA is in none of them.
		err = dial(t, k.Addr, &tls.Config{MinVersion: tls.VersionTLS12}, mech)
		if err == nil {
			t.Fatal("a client that does not trust the test CA connected")
		}
		var unknown x509.UnknownAuthorityError
		if !errors.As(err, &unknown) {
			t.Fatalf("want an x509 unknown authority error, got %T: %v", err, err)
		}
	})

	t.Run("the plaintext listener still serves without credentials", func(t *testing.T) {
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		defer cancel()
		conn, err := (&kafka.Dialer{Timeout: 10 * time.Second}).DialContext(ctx, "tcp", k.PlainAddr)
		if err != nil {
			t.Fatalf("dial the PLAINTEXT listener %s: %v", k.PlainAddr, err)
		}
		defer conn.Close()
		if _, err := conn.Brokers(); err != nil {
			t.Fatalf("metadata over PLAINTEXT: %v", err)
		}
	})
}

// roundTrip creates a topic through addr with TLS and mech, writes a
// message there with all replicas acknowledging, and reads it back.
func roundTrip(t *testing.T, addr string, tlsConfig *tls.Config, mech sasl.Mechanism) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	transport := &kafka.Transport{TLS: tlsConfig, SASL: mech, DialTimeout: 10 * time.Second}
	defer transport.CloseIdleConnections()
	topic := Name(t)

	client := &kafka.Client{Addr: kafka.TCP(addr), Transport: transport, Timeout: 20 * time.Second}
	resp, err := client.CreateTopics(ctx, &kafka.CreateTopicsRequest{
		Topics: []kafka.TopicConfig{{Topic: topic, NumPartitions: 1, ReplicationFactor: 1}},
	})
	if err != nil {
		t.Fatalf("create topic %s over SASL_SSL: %v", topic, err)
	}
	if err := resp.Errors[topic]; err != nil {
		t.Fatalf("create topic %s over SASL_SSL: %v", topic, err)
	}

	w := &kafka.Writer{
		Addr:         kafka.TCP(addr),
		Topic:        topic,
		Transport:    transport,
		RequiredAcks: kafka.RequireAll,
		// A topic just created may not have a leader for a moment.
		MaxAttempts: 20,
	}
	defer w.Close()
	want := "hello " + topic
	if err := w.WriteMessages(ctx, kafka.Message{Key: []byte("k"), Value: []byte(want)}); err != nil {
		t.Fatalf("produce to %s over SASL_SSL: %v", topic, err)
	}

	r := kafka.NewReader(kafka.ReaderConfig{
		Brokers:   []string{addr},
		Topic:     topic,
		Partition: 0,
		MaxWait:   500 * time.Millisecond,
		Dialer:    &kafka.Dialer{Timeout: 10 * time.Second, TLS: tlsConfig, SASLMechanism: mech},
	})
	defer r.Close()
	msg, err := r.ReadMessage(ctx)
	if err != nil {
		t.Fatalf("consume from %s over SASL_SSL: %v", topic, err)
	}
	if got := string(msg.Value); got != want {
		t.Fatalf("read %q, want %q", got, want)
	}
}

// dial opens one connection to addr with TLS and mech: the TLS handshake
// and the SASL exchange both happen before it returns.
func dial(t *testing.T, addr string, tlsConfig *tls.Config, mech sasl.Mechanism) error {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	d := &kafka.Dialer{Timeout: 10 * time.Second, TLS: tlsConfig, SASLMechanism: mech}
	conn, err := d.DialContext(ctx, "tcp", addr)
	if err != nil {
		return err
	}
	// Logged in: a request shows the connection is usable.
	defer conn.Close()
	_, err = conn.Brokers()
	return err
}
