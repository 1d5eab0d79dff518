/* stopwatch LABEL PROGRAM ARGS...: runs PROGRAM (inheriting stdin, stdout and stderr) and
 * prints "BENCH LABEL MICROSECONDS STATUS" (status 128+N when a signal N ended it), the
 * time from before fork() to after waitpid(), CLOCK_MONOTONIC. */
#include <stdio.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static long long now_us(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (long long)t.tv_sec * 1000000 + t.tv_nsec / 1000;
}

int main(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: stopwatch LABEL PROGRAM ARGS...\n");
        return 2;
    }
    long long t0 = now_us();
    pid_t pid = fork();
    if (pid < 0) { perror("fork"); return 2; }
    if (pid == 0) {
        execvp(argv[2], argv + 2);
        perror(argv[2]);
        _exit(127);
    }
    int st;
    if (waitpid(pid, &st, 0) < 0) { perror("waitpid"); return 2; }
    long long t1 = now_us();
    int status = WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
    /* stdout may be a file the caller discards: report on stderr's neighbour, fd 3 */
    dprintf(3, "BENCH %s %lld %d\n", argv[1], t1 - t0, status);
    return 0;
}
