// A Go HTTP server for baton with only the standard library (docs/recipes.md): the listener
// is inherited at descriptor 3 (baton's `protocol: systemd`), readiness is `READY=1` written
// to NOTIFY_SOCKET by hand, and the drain signal (SIGTERM) starts a drain that loses no
// kept-alive request: the listener is closed at once, every later answer says
// `Connection: close`, and connections still idle after a quiet grace period are closed.
//
//	go build -o go-hello . && baton run -c baton.yaml
package main

import (
	"context"
	"fmt"
	"log"
	"net"
	"net/http"
	"os"
	"os/signal"
	"strconv"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

// inherited returns the listener at descriptor 3, checking LISTEN_PID and LISTEN_FDS as
// sd_listen_fds(3) does.
func inherited() (net.Listener, error) {
	if pid, _ := strconv.Atoi(os.Getenv("LISTEN_PID")); pid != os.Getpid() {
		return nil, fmt.Errorf("LISTEN_PID is %q, not this process (%d): no socket to serve", os.Getenv("LISTEN_PID"), os.Getpid())
	}
	if n, _ := strconv.Atoi(os.Getenv("LISTEN_FDS")); n < 1 {
		return nil, fmt.Errorf("LISTEN_FDS is %q: no socket to serve", os.Getenv("LISTEN_FDS"))
	}
	file := os.NewFile(3, "listener")
	defer file.Close() // FileListener holds its own duplicate
	return net.FileListener(file)
}

// notify sends one sd_notify(3) message; without NOTIFY_SOCKET it does nothing.
func notify(state string) error {
	path := os.Getenv("NOTIFY_SOCKET")
	if path == "" {
		return nil
	}
	if path[0] == '@' {
		path = "\x00" + path[1:]
	}
	conn, err := net.DialUnix("unixgram", nil, &net.UnixAddr{Name: path, Net: "unixgram"})
	if err != nil {
		return err
	}
	defer conn.Close()
	_, err = conn.Write([]byte(state))
	return err
}

// tracker counts the connections that are not closed.
type tracker struct {
	mu    sync.Mutex
	conns map[net.Conn]struct{}
}

func (t *tracker) state(c net.Conn, s http.ConnState) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if s == http.StateClosed || s == http.StateHijacked {
		delete(t.conns, c)
	} else {
		t.conns[c] = struct{}{}
	}
}

func (t *tracker) open() int {
	t.mu.Lock()
	defer t.mu.Unlock()
	return len(t.conns)
}

func main() {
	log.SetFlags(0)
	ln, err := inherited()
	if err != nil {
		log.Fatalf("go-hello: %v", err)
	}
	generation := os.Getenv("BATON_GENERATION")
	body := fmt.Sprintf("hello from go, pid %d, generation %s\n", os.Getpid(), generation)
	conns := &tracker{conns: map[net.Conn]struct{}{}}
	var draining atomic.Bool
	server := &http.Server{
		Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			if draining.Load() {
				w.Header().Set("Connection", "close") // the server closes after this answer
			}
			w.Header().Set("x-baton-generation", generation)
			w.Header().Set("content-type", "text/plain")
			fmt.Fprint(w, body)
		}),
		ConnState:         conns.state,
		ReadHeaderTimeout: 10 * time.Second,
	}
	served := make(chan error, 1)
	go func() { served <- server.Serve(ln) }()
	if err := notify("READY=1"); err != nil {
		log.Fatalf("go-hello: READY=1 to NOTIFY_SOCKET: %v", err)
	}

	stop := make(chan os.Signal, 1)
	signal.Notify(stop, syscall.SIGTERM, syscall.SIGINT)
	select {
	case err := <-served:
		log.Fatalf("go-hello: serving: %v", err)
	case <-stop:
	}
	// Drain. Stop accepting (this process's copy of the listener only: the next generation
	// accepts on its own), and answer every later request with `Connection: close`, so a
	// kept-alive client learns of the close from an answer instead of losing a request to it.
	// (Not SetKeepAlivesEnabled(false): it also closes every idle connection at once, and a
	// request already on its way over one of them is lost.)
	notify("STOPPING=1")
	ln.Close()
	draining.Store(true)
	// Connections still open and quiet for `grace` belong to clients that are not sending:
	// Shutdown closes those that are idle and waits for the others to finish their request.
	grace := 500 * time.Millisecond
	deadline := time.Now().Add(5 * time.Second)
	for last := conns.open(); last > 0 && time.Now().Before(deadline); {
		time.Sleep(grace)
		now := conns.open()
		if now == last {
			break
		}
		last = now
	}
	ctx, cancel := context.WithDeadline(context.Background(), deadline)
	defer cancel()
	if err := server.Shutdown(ctx); err != nil {
		log.Printf("go-hello: drain: %v", err)
	}
}
