/* A program outside the project that uses the installed libplasa: a tiny
 * matmul and its backward, checked by the program itself. */
#include <math.h>
#include <plasa.h>
#include <stdio.h>
#include <string.h>

int main(void) {
    char version[32];
    snprintf(version, sizeof version, "%d.%d.%d", PL_VERSION_MAJOR, PL_VERSION_MINOR,
             PL_VERSION_PATCH);
    if (strcmp(version, pl_version()) != 0) {
        printf("consumer: header %s but library %s\n", version, pl_version());
        return 1;
    }
    pl_ctx *ctx = pl_ctx_new(NULL);
    pl_tensor *w = pl_param_new(ctx, "w", PL_DIMS(2, 2));
    const float wd[4] = {1, 2, 3, 4}, xd[2] = {1, -1};
    if (!w || pl_copy_from(w, wd, 4) != PL_OK) goto fail;
    /* loss = sum(x W) = (1 - 3) + (2 - 4) = -4;  d loss / d W[i][j] = x[i]. */
    pl_tensor *x = pl_from_data(ctx, PL_F32, PL_DIMS(1, 2), xd);
    pl_tensor *y = pl_matmul(ctx, x, w, false, false);
    pl_tensor *loss = pl_matmul(ctx, y, pl_full(ctx, PL_DIMS(2, 1), 1.0f), false, false);
    if (!loss || pl_backward(ctx, loss) != PL_OK) goto fail;
    const float want[4] = {1, 1, -1, -1};
    float l = pl_f32(loss)[0];
    int ok = fabsf(l + 4.0f) < 1e-6f;
    for (int i = 0; i < 4; i++) ok &= fabsf(w->grad[i] - want[i]) < 1e-6f;
    printf("consumer: libplasa %s loss %g grad %g %g %g %g: %s\n", pl_version(), l, w->grad[0],
           w->grad[1], w->grad[2], w->grad[3], ok ? "ok" : "WRONG");
    pl_ctx_free(ctx);
    return ok ? 0 : 1;
fail:
    printf("consumer: %s\n", pl_last_error());
    pl_ctx_free(ctx);
    return 1;
}
