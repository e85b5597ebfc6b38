/* The pod sandbox ("pause") process of the test bed's node: PID 1 of every pod's
 * namespaces. It holds them open, reaps children and exits on SIGINT or SIGTERM, as
 * Kubernetes' own pause does. Built statically by hack/build-images.sh, because no image
 * registry is reachable here to pull one. */
#include <signal.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>

static void stop(int sig) { _exit(sig == SIGTERM || sig == SIGINT ? 0 : 1); }

static void reap(int sig) {
  (void)sig;
  while (waitpid(-1, NULL, WNOHANG) > 0) {
  }
}

int main(void) {
  struct sigaction act = {0};
  act.sa_handler = stop;
  sigaction(SIGINT, &act, NULL);
  sigaction(SIGTERM, &act, NULL);
  act.sa_handler = reap;
  act.sa_flags = SA_NOCLDSTOP;
  sigaction(SIGCHLD, &act, NULL);
  for (;;) pause();
}
