package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"strings"
	"testing"
	"time"

	"github.com/segmentio/kafka-go"

	edgekafka "github.com/tollgate-dev/tollgate/edge/kafka"
	"github.com/tollgate-dev/tollgate/ingest"
	ingestkafka "github.com/tollgate-dev/tollgate/ingest/kafka"
	"github.com/tollgate-dev/tollgate/internal/testenv"
	invkafka "github.com/tollgate-dev/tollgate/invoicer/kafka"
	"github.com/tollgate-dev/tollgate/schemas"
)

// Every Kafka client Tollgate has, built from the configuration as the
// commands build them, against a real broker's SASL_SSL listener (TLS with
// a certificate from a CA made for the test, and SASL): the edge's producer, ingest's consumer group member, its
// offsets reader and dead-letter writer, the invoicer's log reader, topic
// creation and the readiness check. The listener also asks for a client
// certificate (mutual TLS), which each client shows from the settings. A
// client left on plaintext, or without the credentials or the certificate,
// would fail here.
func TestEveryKafkaClientWorksOverTLSAndSASL(t *testing.T) {
	sk := testenv.PrivateMutualTLSKafka(t)
	for _, mech := range []string{"SCRAM-SHA-512", "PLAIN"} {
		t.Run("with "+mech+" every client reads and writes", func(t *testing.T) {
			secureKafkaEnv(t, sk, map[string]string{"TOLLGATE_KAFKA_SASL_MECHANISM": mech})
			cfg := writeConfig(t, "")
			if err := cfg.Validate("edge", "ingest"); err != nil {
				t.Fatalf("validate: %v", err)
			}
			kc, err := cfg.Services.kafkaCluster()
			if err != nil {
				t.Fatal(err)
			}
			ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
			defer cancel()
			topic := strings.ReplaceAll(testenv.Name(t), "_", ".")
			dlq := topic + ".dlq"
			if err := ensureTopics(ctx, kc, 2, topic, dlq); err != nil {
				t.Fatalf("create topics over SASL_SSL: %v", err)
			}
			if err := kafkaDep(kc).check(ctx); err != nil {
				t.Fatalf("readiness over SASL_SSL: %v", err)
			}

			const n = 50
			p, err := edgekafka.NewProducer(edgekafka.Config{Brokers: kc.brokers, Security: kc.sec, Topic: topic, SpoolDir: t.TempDir()},
				nil, slog.New(slog.DiscardHandler))
			if err != nil {
				t.Fatal(err)
			}
			want := map[string]bool{}
			for i := range n {
				ev := schemas.Event{Version: 1, ID: schemas.NewEventID(), AccountID: fmt.Sprintf("acct_%d", i%3), Environment: schemas.Live,
					KeyID: "key_x", Type: "api_call", Time: time.Now().UTC().Truncate(time.Microsecond), Units: 1}
				want[ev.ID.String()] = true
				p.Emit(ev)
			}
			if err := p.Close(); err != nil {
				t.Fatalf("close the producer: %v", err)
			}
			if d := p.SpoolDepth(); d != 0 || !p.KafkaUp() {
				t.Fatalf("after close: %d events spooled, Kafka up %v; want every event taken by the broker", d, p.KafkaUp())
			}

			src := ingestkafka.NewSource(kc.brokers, kc.sec, topic, topic+".ingest")
			defer src.Close()
			var got []ingest.Message
			for len(got) < n {
				m, err := src.Fetch(ctx)
				if err != nil {
					t.Fatalf("fetch over SASL_SSL after %d of %d: %v", len(got), n, err)
				}
				got = append(got, m)
			}
			for _, m := range got {
				ev, err := schemas.Decode(m.Value, time.Now())
				if err != nil || !want[ev.ID.String()] {
					t.Fatalf("record %d/%d: %v, id known %v", m.Partition, m.Offset, err, err == nil && want[ev.ID.String()])
				}
				delete(want, ev.ID.String())
			}
			if err := src.Commit(ctx, got...); err != nil {
				t.Fatalf("commit over SASL_SSL: %v", err)
			}
			offs, err := ingestkafka.NewOffsets(kc.brokers, kc.sec, topic, topic+".ingest").Offsets(ctx)
			if err != nil {
				t.Fatalf("offsets over SASL_SSL: %v", err)
			}
			var committed int64
			for _, o := range offs {
				if o.End == 0 { // a partition no account's key hashed to
					continue
				}
				committed += o.Committed
				if o.Committed != o.End {
					t.Fatalf("partition offsets %+v: want everything committed", offs)
				}
			}
			if committed != n {
				t.Fatalf("committed %d records in all, want %d", committed, n)
			}

			dl := ingestkafka.NewDeadLetters(kc.brokers, kc.sec, dlq, topic)
			bad := ingest.Rejected{Message: ingest.Message{Partition: 1, Offset: 7, Value: []byte("{not json")}, Reason: "not JSON"}
			if err := dl.Reject(ctx, []ingest.Rejected{bad}); err != nil {
				t.Fatalf("dead letter over SASL_SSL: %v", err)
			}
			var read, dead int
			if err := (&invkafka.Log{Brokers: kc.brokers, Security: kc.sec, Topic: topic}).Read(ctx, time.Time{}, 100,
				func(ms []invkafka.Message) error { read += len(ms); return nil }, nil); err != nil {
				t.Fatalf("replay's read over SASL_SSL: %v", err)
			}
			if err := (&invkafka.Log{Brokers: kc.brokers, Security: kc.sec, Topic: dlq}).Read(ctx, time.Time{}, 100,
				func(ms []invkafka.Message) error {
					for _, m := range ms {
						if string(m.Value) == "{not json" && m.Partition == 1 {
							dead++
						}
					}
					return nil
				}, nil); err != nil {
				t.Fatalf("read the dead letters over SASL_SSL: %v", err)
			}
			if read != n || dead != 1 {
				t.Fatalf("the log holds %d records and the dead-letter topic %d copies of the rejected one; want %d and 1", read, dead, n)
			}
		})
	}

	t.Run("the edge and ingest as the commands build them land events over SASL_SSL", func(t *testing.T) {
		pg, ch := testenv.NewPostgres(t), testenv.NewClickHouse(t)
		topic := strings.ReplaceAll(testenv.Name(t), "_", ".")
		cfg := testConfig(t, pg, ch, topic)
		cfg.Services.KafkaBrokers = []string{sk.Addr}
		cfg.Services.KafkaTLS, cfg.Services.KafkaTLSCAFile = true, sk.CAFile
		cfg.Services.KafkaTLSCertFile, cfg.Services.KafkaTLSKeyFile = sk.ClientCertFile, sk.ClientKeyFile
		cfg.Services.KafkaSASLMechanism, cfg.Services.KafkaSASLUsername, cfg.Services.KafkaSASLPassword = "SCRAM-SHA-256", sk.User, sk.Password
		cfg.Edge.SpoolDir, cfg.Edge.Upstream = t.TempDir(), "http://127.0.0.1:9"
		testenv.Must(t, cfg.Validate("edge", "ingest"), "validate")
		ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
		defer cancel()
		em, err := NewEdgeMain(ctx, cfg, quietLog())
		testenv.Must(t, err, "start the edge")
		t.Cleanup(func() { _ = em.Close() })
		im, err := NewIngestMain(ctx, cfg, quietLog())
		testenv.Must(t, err, "start ingest")
		ictx, stop := context.WithCancel(ctx)
		done := make(chan error, 1)
		go func() { done <- im.Run(ictx) }()
		t.Cleanup(func() { stop(); <-done; _ = im.Close() })
		const n = 40
		for i := range n {
			em.producer.Emit(schemas.Event{Version: 1, ID: schemas.NewEventID(), AccountID: fmt.Sprintf("acct_%d", i%4), Environment: schemas.Live,
				KeyID: "key_x", Type: "api_call", Time: time.Now().UTC().Truncate(time.Microsecond), Units: 1})
		}
		waitLanded(t, ch, n)
		if d := em.producer.SpoolDepth(); d != 0 {
			t.Fatalf("%d events spooled: the edge's producer did not reach the broker", d)
		}
	})

	t.Run("a wrong password is refused by the broker and reported as such", func(t *testing.T) {
		secureKafkaEnv(t, sk, map[string]string{"TOLLGATE_KAFKA_SASL_PASSWORD": sk.Password + "x"})
		err := secureKafkaReady(t)
		if !errors.Is(err, kafka.SASLAuthenticationFailed) {
			t.Fatalf("readiness with a wrong password = %v; want the broker's SASL authentication failure", err)
		}
		if strings.Contains(err.Error(), sk.Password) {
			t.Fatalf("the error %q quotes the password", err)
		}
	})

	t.Run("without a client certificate the broker refuses the connection", func(t *testing.T) {
		secureKafkaEnv(t, sk, map[string]string{"TOLLGATE_KAFKA_TLS_CERT_FILE": "", "TOLLGATE_KAFKA_TLS_KEY_FILE": ""})
		if err := secureKafkaReady(t); err == nil {
			t.Fatal("readiness without a client certificate succeeded against a broker that asks for one")
		}
	})

	t.Run("a broker whose certificate the CA file does not vouch for is refused", func(t *testing.T) {
		// No CA file: the system's roots, which never signed the test's CA.
		secureKafkaEnv(t, sk, map[string]string{"TOLLGATE_KAFKA_TLS_CA_FILE": ""})
		if err := secureKafkaReady(t); err == nil || !strings.Contains(err.Error(), "certificate") {
			t.Fatalf("readiness against an unknown CA = %v; want a certificate error", err)
		}
	})
}

// secureKafkaEnv sets the environment that configures every Kafka client
// for sk's SASL_SSL listener: TLS with its CA and the client certificate,
// SCRAM-SHA-256 with its user and password. change replaces variables; an
// empty value leaves one unset.
func secureKafkaEnv(t *testing.T, sk *testenv.SecureKafka, change map[string]string) {
	t.Helper()
	env := map[string]string{
		"TOLLGATE_KAFKA_BROKERS":        sk.Addr,
		"TOLLGATE_KAFKA_TLS":            "true",
		"TOLLGATE_KAFKA_TLS_CA_FILE":    sk.CAFile,
		"TOLLGATE_KAFKA_TLS_CERT_FILE":  sk.ClientCertFile,
		"TOLLGATE_KAFKA_TLS_KEY_FILE":   sk.ClientKeyFile,
		"TOLLGATE_KAFKA_SASL_MECHANISM": "SCRAM-SHA-256",
		"TOLLGATE_KAFKA_SASL_USERNAME":  sk.User,
		"TOLLGATE_KAFKA_SASL_PASSWORD":  sk.Password,
	}
	maps.Copy(env, change)
	for k, v := range env {
		if v != "" {
			t.Setenv(k, v)
		}
	}
}

// secureKafkaReady is the Kafka readiness check's answer, with the clients
// configured as the environment says.
func secureKafkaReady(t *testing.T) error {
	t.Helper()
	kc, err := writeConfig(t, "").Services.kafkaCluster()
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	return kafkaDep(kc).check(ctx)
}
