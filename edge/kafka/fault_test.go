package kafka_test

import (
	"context"
	"net/http"
	"sync"
	"testing"
	"time"

	"github.com/segmentio/kafka-go"

	"github.com/tollgate-dev/tollgate/edge"
	"github.com/tollgate-dev/tollgate/internal/edgetest"
	"github.com/tollgate-dev/tollgate/internal/testenv"
	"github.com/tollgate-dev/tollgate/schemas"
)

// send makes n calls with workers in parallel and returns the Request-Id of
// every call the edge answered 200.
func send(t *testing.T, url, key string, n, workers int) []string {
	t.Helper()
	client := &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: workers}, Timeout: 10 * time.Second}
	var mu sync.Mutex
	var ids []string
	var wg sync.WaitGroup
	next := make(chan struct{}, n)
	for i := 0; i < n; i++ {
		next <- struct{}{}
	}
	close(next)
	errs := make(chan error, workers)
	for w := 0; w < workers; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for range next {
				req, _ := http.NewRequest("GET", url+"/v1/widgets/1", nil)
				req.Header.Set("Authorization", "Bearer "+key)
				resp, err := client.Do(req)
				if err != nil {
					errs <- err
					return
				}
				resp.Body.Close()
				if resp.StatusCode == 200 {
					mu.Lock()
					ids = append(ids, resp.Header.Get(edge.HeaderRequestID))
					mu.Unlock()
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatalf("call: %v", err)
	}
	return ids
}

func TestKafkaDownThenBackEveryEventExactlyOnce(t *testing.T) {
	broker := testenv.PrivateKafka(t)
	brokers := []string{broker.Addr}
	const topic = "usage.fault"
	client := &kafka.Client{Addr: kafka.TCP(brokers...), Timeout: 20 * time.Second}
	res, err := client.CreateTopics(context.Background(), &kafka.CreateTopicsRequest{
		Topics: []kafka.TopicConfig{{Topic: topic, NumPartitions: 4, ReplicationFactor: 1}}})
	testenv.Must(t, err, "create topic")
	testenv.Must(t, res.Errors[topic], "create topic")

	env := edgetest.New(t)
	in := env.Start(t, edgetest.Options{Brokers: brokers, Topic: topic})
	key, _ := env.Key(t, "acct_fault", edge.Secret, schemas.Live)
	env.SetPlan(t, "acct_fault", "unlimited", edge.Limits{RequestsPerSecond: 1_000_000, Burst: 1_000_000}, "")

	broker.Stop()
	const n = 10_000
	ids := send(t, in.URL, key, n, 16)
	if len(ids) != n {
		t.Fatalf("%d of %d calls answered 200 while Kafka was down", len(ids), n)
	}
	testenv.Wait(t, 30*time.Second, "every event spooled", func() bool { return in.Producer.SpoolDepth() == n })
	if in.Producer.KafkaUp() {
		t.Fatal("the producer thinks Kafka is up while it is stopped")
	}
	broker.Start()
	testenv.Wait(t, 90*time.Second, "spool drained to Kafka", func() bool { return in.Producer.SpoolDepth() == 0 })
	testenv.Must(t, in.Producer.Close(), "close producer")

	evs := edgetest.ReadTopic(t, brokers, topic, n, 60*time.Second)
	if len(evs) != n {
		t.Fatalf("%d events in the topic, want exactly %d", len(evs), n)
	}
	seen := make(map[string]bool, n)
	byRequest := make(map[string]bool, n)
	for _, ev := range evs {
		if seen[ev.ID.String()] {
			t.Fatalf("event %s is in the topic twice", ev.ID)
		}
		seen[ev.ID.String()] = true
		byRequest[ev.RequestID] = true
	}
	for _, id := range ids {
		if !byRequest[id] {
			t.Fatalf("accepted call %s has no event", id)
		}
	}
}
