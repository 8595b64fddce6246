package testenv

import (
	"context"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
)

func TestPrivateInstanceSurvivesStopStartAndKill9(t *testing.T) {
	inst := PrivateRedis(t)
	if inst.Addr == RedisAddr() {
		t.Fatalf("private instance shares the shared address %s", inst.Addr)
	}
	c := redis.NewClient(&redis.Options{Addr: inst.Addr, MaxRetries: -1})
	defer c.Close()
	ping := func() error {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		return c.Ping(ctx).Err()
	}
	if err := ping(); err != nil {
		t.Fatalf("private redis does not answer: %v", err)
	}
	inst.Stop()
	if err := ping(); err == nil {
		t.Fatal("private redis still answers after Stop")
	}
	inst.Start()
	if err := ping(); err != nil {
		t.Fatalf("private redis does not answer after Start: %v", err)
	}
	inst.Kill9()
	if err := ping(); err == nil {
		t.Fatal("private redis still answers after Kill9")
	}
	inst.Start()
	if err := ping(); err != nil {
		t.Fatalf("private redis does not answer after restart: %v", err)
	}
	// The shared instance was never touched.
	shared := redis.NewClient(&redis.Options{Addr: RedisAddr()})
	defer shared.Close()
	if err := shared.Ping(context.Background()).Err(); err != nil {
		Unreachable(t, "Redis", RedisAddr(), err)
	}
}
