// memberlist-node runs one HashiCorp memberlist member with the library's LAN defaults,
// so the cluster benchmark can set it beside the dunix agent on the same simulated hosts.
//
// Every membership event goes to stdout as one JSON line with a wall-clock timestamp in
// float seconds (as Python's time.time()):
//
//	{"event": "join", "name": "n3", "time": 1795948800.123456}
//
// memberlist reports a member it declared dead through NotifyLeave, so "leave" is the
// death event as well as a graceful leave. There is no suspect event: memberlist 0.2.2
// keeps suspicion in its private node state (the public Node.State is never updated),
// so the benchmark counts the "Suspect X has failed" lines of the library's own log,
// which goes to stderr.
package main

import (
	"bufio"
	"encoding/json"
	"flag"
	"fmt"
	"net"
	"os"
	"os/signal"
	"strconv"
	"sync"
	"syscall"
	"time"

	"github.com/hashicorp/memberlist"
)

// eventLog writes one JSON line per event and flushes it at once: the benchmark reads
// the lines as they come and takes their timestamps as the moment of observation.
type eventLog struct {
	mu  sync.Mutex
	out *bufio.Writer
}

type eventLine struct {
	Event string          `json:"event"`
	Name  string          `json:"name"`
	Time  json.RawMessage `json:"time"`
}

func (l *eventLog) emit(event string, node *memberlist.Node) {
	now := float64(time.Now().UnixNano()) / 1e9
	line, err := json.Marshal(eventLine{
		Event: event,
		Name:  node.Name,
		Time:  json.RawMessage(strconv.FormatFloat(now, 'f', 6, 64)),
	})
	if err != nil {
		fmt.Fprintf(os.Stderr, "memberlist-node: encode event: %v\n", err)
		return
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	l.out.Write(line)
	l.out.WriteByte('\n')
	l.out.Flush()
}

// NotifyJoin, NotifyLeave and NotifyUpdate make eventLog a memberlist.EventDelegate.
func (l *eventLog) NotifyJoin(n *memberlist.Node)   { l.emit("join", n) }
func (l *eventLog) NotifyLeave(n *memberlist.Node)  { l.emit("leave", n) }
func (l *eventLog) NotifyUpdate(n *memberlist.Node) { l.emit("update", n) }

func splitHostPort(addr string) (string, int, error) {
	host, port, err := net.SplitHostPort(addr)
	if err != nil {
		return "", 0, err
	}
	p, err := strconv.Atoi(port)
	if err != nil {
		return "", 0, fmt.Errorf("port %q: %v", port, err)
	}
	return host, p, nil
}

func main() {
	name := flag.String("name", "", "member name (the host name)")
	bind := flag.String("bind", "", "address:port to bind, UDP and TCP (e.g. 10.213.0.1:7950)")
	join := flag.String("join", "", "address:port of a member to join (empty: start alone)")
	flag.Parse()
	if *name == "" || *bind == "" {
		fmt.Fprintln(os.Stderr, "usage: memberlist-node -name NAME -bind ADDR:PORT [-join ADDR:PORT]")
		os.Exit(2)
	}
	host, port, err := splitHostPort(*bind)
	if err != nil {
		fmt.Fprintf(os.Stderr, "memberlist-node: -bind %q: %v\n", *bind, err)
		os.Exit(2)
	}

	// The LAN defaults stay as they are: the benchmark compares dunix with what a
	// Consul or Serf user gets out of the box.
	conf := memberlist.DefaultLANConfig()
	conf.Name = *name
	conf.BindAddr = host
	conf.BindPort = port
	conf.AdvertiseAddr = host
	conf.AdvertisePort = port
	conf.Events = &eventLog{out: bufio.NewWriter(os.Stdout)}
	conf.LogOutput = os.Stderr

	list, err := memberlist.Create(conf)
	if err != nil {
		fmt.Fprintf(os.Stderr, "memberlist-node: create: %v\n", err)
		os.Exit(1)
	}
	if *join != "" {
		// The seed may not be up yet when all hosts start together: retry for a while.
		deadline := time.Now().Add(30 * time.Second)
		for {
			_, err = list.Join([]string{*join})
			if err == nil || time.Now().After(deadline) {
				break
			}
			time.Sleep(200 * time.Millisecond)
		}
		if err != nil {
			fmt.Fprintf(os.Stderr, "memberlist-node: join %s: %v\n", *join, err)
			os.Exit(1)
		}
	}

	stop := make(chan os.Signal, 1)
	signal.Notify(stop, syscall.SIGINT, syscall.SIGTERM)
	<-stop
	list.Leave(time.Second)
	list.Shutdown()
}
