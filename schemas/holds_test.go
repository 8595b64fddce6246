package schemas

import (
	"testing"
	"time"
)

func TestHeldThrough(t *testing.T) {
	wm := time.Date(2026, 11, 28, 12, 0, 0, 0, time.UTC)
	at := func(h int) time.Time { return wm.Add(time.Duration(h) * time.Hour) }
	for _, c := range []struct {
		name  string
		holds []SpoolHold
		want  time.Time
	}{
		{"no hold", nil, wm},
		{"a hold still spooling caps the watermark at its first event", []SpoolHold{{Since: at(-3)}}, at(-3)},
		{"a drained hold caps it until the watermark reaches its release", []SpoolHold{{Since: at(-3), Released: at(1)}}, at(-3)},
		{"a drained hold the watermark has reached no longer counts", []SpoolHold{{Since: at(-3), Released: wm}}, wm},
		{"a hold later than the watermark changes nothing", []SpoolHold{{Since: at(2)}}, wm},
		{"the earliest of several", []SpoolHold{{Since: at(-1)}, {Since: at(-5), Released: at(2)}, {Since: at(-9), Released: at(-1)}}, at(-5)},
	} {
		if got := HeldThrough(wm, c.holds); !got.Equal(c.want) {
			t.Errorf("%s: %s, want %s", c.name, got, c.want)
		}
	}
}
