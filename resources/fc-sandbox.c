/* fc-sandbox [--cloud-hypervisor] VMM API_SOCK LOAD_BODY LOG -- CLIENT [ARG]...: a Firecracker
 * (or Cloud Hypervisor) sandbox run for the benchmarks, with no shell or curl in the timed
 * path. Starts VMM (Firecracker: --api-sock API_SOCK; Cloud Hypervisor: --api-socket
 * path=API_SOCK; its output to LOG), connects to its API socket as soon as it accepts
 * (retrying every millisecond), sends `PUT /snapshot/load` (Cloud Hypervisor:
 * `PUT /api/v1/vm.restore`, whose body should ask for "resume": true) with the JSON
 * LOAD_BODY, then runs CLIENT (the guest agent's client: it connects over the VMM's vsock
 * socket, refreshes the guest and runs the command), and when CLIENT ends kills the VMM
 * (SIGKILL: Firecracker has no other way to stop a VM at once; both are treated alike) and
 * waits for it. With FC_PIDFILE set, writes the VMM's pid there once the load answered (the
 * density benchmark measures the running VMs). Prints "FCPHASE API LOAD CLIENT END" on
 * stderr: microseconds from this program's start to the API accepting, the load answering,
 * CLIENT's exit and the VMM's reaping. Exit status: CLIENT's; 125 if the VMM or the load
 * failed. */
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static long long t0;

static long long now_us(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (long long)t.tv_sec * 1000000 + t.tv_nsec / 1000;
}

static pid_t fc = -1;

static int fail(const char *what) {
    fprintf(stderr, "fc-sandbox: %s\n", what);
    if (fc > 0) {
        kill(fc, SIGKILL);
        waitpid(fc, NULL, 0);
    }
    return 125;
}

int main(int argc, char **argv) {
    t0 = now_us();
    int ch = argc > 1 && strcmp(argv[1], "--cloud-hypervisor") == 0;
    if (ch) {
        argc--;
        argv++;
    }
    if (argc < 7 || strcmp(argv[5], "--") != 0) {
        fprintf(stderr, "usage: fc-sandbox [--cloud-hypervisor] VMM API_SOCK LOAD_BODY LOG -- CLIENT [ARG]...\n");
        return 2;
    }
    const char *sock = argv[2], *body = argv[3], *logpath = argv[4];
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    if (strlen(sock) >= sizeof addr.sun_path) return fail("API socket path too long");
    strcpy(addr.sun_path, sock);
    unlink(sock);

    fc = fork();
    if (fc < 0) return fail("fork failed");
    if (fc == 0) {
        int log = open(logpath, O_WRONLY | O_CREAT | O_TRUNC, 0600);
        int null = open("/dev/null", O_RDONLY);
        if (log < 0 || null < 0) _exit(127);
        dup2(null, 0);
        dup2(log, 1);
        dup2(log, 2);
        if (ch) {
            char arg[sizeof addr.sun_path + 5];
            snprintf(arg, sizeof arg, "path=%s", sock);
            execl(argv[1], argv[1], "--api-socket", arg, (char *)NULL);
        } else {
            execl(argv[1], argv[1], "--api-sock", sock, "--level", "Error", (char *)NULL);
        }
        _exit(127);
    }

    int s = -1;
    for (int tries = 0;; tries++) {
        s = socket(AF_UNIX, SOCK_STREAM, 0);
        if (s < 0) return fail("socket failed");
        if (connect(s, (struct sockaddr *)&addr, sizeof addr) == 0) break;
        close(s);
        if (waitpid(fc, NULL, WNOHANG) == fc) {
            fc = -1;
            return fail("the VMM exited before its API socket accepted");
        }
        if (tries > 20000) return fail("the VMM's API socket never accepted");
        usleep(1000);
    }
    long long t_api = now_us() - t0;

    char req[8192];
    int n = snprintf(req, sizeof req,
                     "PUT %s HTTP/1.1\r\nHost: localhost\r\n"
                     "Content-Type: application/json\r\nContent-Length: %zu\r\n\r\n%s",
                     ch ? "/api/v1/vm.restore" : "/snapshot/load", strlen(body), body);
    if (n <= 0 || (size_t)n >= sizeof req) return fail("load body too long");
    for (int off = 0; off < n;) {
        ssize_t w = write(s, req + off, (size_t)(n - off));
        if (w <= 0) return fail("cannot send the load request");
        off += (int)w;
    }
    /* The answer: a status line and headers (a 204 has no body; an error's body is short). */
    char resp[4096];
    size_t got = 0;
    while (got < sizeof resp - 1) {
        ssize_t r = read(s, resp + got, sizeof resp - 1 - got);
        if (r <= 0) break;
        got += (size_t)r;
        resp[got] = 0;
        char *end = strstr(resp, "\r\n\r\n");
        if (end) {
            char *cl = strstr(resp, "Content-Length: ");
            size_t want = cl ? (size_t)atol(cl + 16) : 0;
            if (got >= (size_t)(end + 4 - resp) + want) break;
        }
    }
    resp[got] = 0;
    close(s);
    if (strncmp(resp, "HTTP/1.1 2", 10) != 0) {
        fprintf(stderr, "fc-sandbox: the load failed: %s\n", resp);
        return fail("snapshot load refused");
    }
    long long t_load = now_us() - t0;

    const char *pidfile = getenv("FC_PIDFILE");
    if (pidfile) {
        FILE *f = fopen(pidfile, "w");
        if (!f) return fail("cannot write FC_PIDFILE");
        fprintf(f, "%d\n", (int)fc);
        fclose(f);
    }

    pid_t client = fork();
    if (client < 0) return fail("fork failed");
    if (client == 0) {
        execvp(argv[6], argv + 6);
        perror(argv[6]);
        _exit(127);
    }
    int st;
    if (waitpid(client, &st, 0) < 0) return fail("waitpid failed");
    long long t_client = now_us() - t0;
    kill(fc, SIGKILL);
    waitpid(fc, NULL, 0);
    long long t_end = now_us() - t0;
    fprintf(stderr, "FCPHASE %lld %lld %lld %lld\n", t_api, t_load, t_client, t_end);
    if (WIFEXITED(st)) return WEXITSTATUS(st);
    return 128 + WTERMSIG(st);
}
