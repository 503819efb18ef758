/* SPDX-License-Identifier: MIT OR Apache-2.0 */
/*
 * segment: in-context segmentation from C with libiris.
 *
 *   segment MODEL_DIR REF_IMAGE REF_LABELS QUERY_IMAGE OUT_LABELS [TRUTH_LABELS]
 *
 * Loads the model, reads the reference image and its label map and the
 * query image through libiris (no NIfTI code here), encodes every label
 * present in the reference into one task, segments the query, writes the
 * labels next to the query's header, and with TRUTH_LABELS prints the Dice
 * score of each class. Every call's status is checked; on failure the
 * program prints libiris's message and frees whatever it holds.
 *
 * Build: see examples/c/Makefile (pkg-config iris).
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "iris.h"

/* Everything the program holds, so one cleanup path frees it all. */
typedef struct {
    IrisModel *model;
    IrisVolume *reference, *reference_labels, *query, *truth;
    IrisTask *task;
    uint16_t *labels;
    uint16_t *values;
} State;

static void release(State *s) {
    iris_model_free(&s->model);
    iris_volume_free(&s->reference);
    iris_volume_free(&s->reference_labels);
    iris_volume_free(&s->query);
    iris_volume_free(&s->truth);
    iris_task_free(&s->task);
    free(s->labels);
    free(s->values);
}

/* Prints the failed call and libiris's message; returns 1 on failure. */
static int failed(IrisStatus status, const char *what) {
    if (status == IRIS_OK) {
        return 0;
    }
    fprintf(stderr, "segment: %s failed: %s: %s\n", what, iris_status_name((int)status),
            iris_last_error());
    return 1;
}

/* A view of a volume libiris owns (only struct_size needs setting). */
static int view_of(const IrisVolume *volume, IrisVolumeView *view, const char *what) {
    memset(view, 0, sizeof *view);
    view->struct_size = sizeof *view;
    return failed(iris_volume_view(volume, view), what);
}

static uint64_t voxel_count(const IrisVolumeView *v) {
    return v->dims[0] * v->dims[1] * v->dims[2];
}

/* The distinct non-zero labels of a uint16 label map, ascending. */
static size_t labels_present(const IrisVolumeView *v, uint16_t **out) {
    static unsigned char seen[65536];
    const uint16_t *voxels = (const uint16_t *)v->data;
    uint64_t i, n = voxel_count(v);
    size_t count = 0;
    unsigned label;
    memset(seen, 0, sizeof seen);
    for (i = 0; i < n; i++) {
        seen[voxels[i]] = 1;
    }
    *out = malloc(65536 * sizeof **out);
    if (*out == NULL) {
        return 0;
    }
    for (label = 1; label < 65536; label++) {
        if (seen[label]) {
            (*out)[count++] = (uint16_t)label;
        }
    }
    return count;
}

int main(int argc, char **argv) {
    State s;
    IrisVolumeView reference, reference_labels, query, result, truth;
    IrisSegmentOptions options;
    size_t count, k;
    uint64_t bytes;
    int status = 1;

    memset(&s, 0, sizeof s);
    if (argc != 6 && argc != 7) {
        fprintf(stderr, "usage: segment MODEL_DIR REF_IMAGE REF_LABELS QUERY_IMAGE "
                        "OUT_LABELS [TRUTH_LABELS]\n");
        return 2;
    }
    if (failed(iris_check_abi(IRIS_ABI_VERSION), "iris_check_abi")) {
        return 1;
    }
    printf("libiris %s\n", iris_version_string());

    if (failed(iris_model_load(argv[1], &s.model), "iris_model_load") ||
        failed(iris_volume_read_nifti(argv[2], 0, &s.reference), "reading the reference") ||
        failed(iris_volume_read_nifti(argv[3], 1, &s.reference_labels),
               "reading the reference labels") ||
        failed(iris_volume_read_nifti(argv[4], 0, &s.query), "reading the query") ||
        view_of(s.reference, &reference, "iris_volume_view") ||
        view_of(s.reference_labels, &reference_labels, "iris_volume_view") ||
        view_of(s.query, &query, "iris_volume_view")) {
        goto done;
    }

    count = labels_present(&reference_labels, &s.values);
    if (count == 0) {
        fprintf(stderr, "segment: %s has no non-zero label (or out of memory)\n", argv[3]);
        goto done;
    }
    /* names == NULL: the classes are stored without names. */
    if (failed(iris_task_encode(s.model, &reference, &reference_labels, s.values, NULL, count,
                                NULL, &s.task),
               "iris_task_encode")) {
        goto done;
    }
    printf("encoded %zu class(es) from %s\n", count, argv[3]);

    /* uint16 labels on the query's grid: D*H*W values, C order. */
    bytes = voxel_count(&query) * sizeof *s.labels;
    s.labels = malloc((size_t)bytes);
    if (s.labels == NULL) {
        fprintf(stderr, "segment: out of memory for %llu bytes\n", (unsigned long long)bytes);
        goto done;
    }
    if (failed(iris_segment_options_default(&options), "iris_segment_options_default") ||
        failed(iris_segment(s.model, &query, s.task, &options, IRIS_DATA_TYPE_U16, s.labels, bytes,
                            NULL, 0),
               "iris_segment")) {
        goto done;
    }

    /* The result lies on the query's grid: reuse its view for the geometry. */
    result = query;
    result.dtype = IRIS_DATA_TYPE_U16;
    result.data = s.labels;
    result.data_bytes = bytes;
    if (failed(iris_volume_write_nifti_labels(argv[5], &result, s.query),
               "iris_volume_write_nifti_labels")) {
        goto done;
    }
    printf("wrote %s\n", argv[5]);

    if (argc == 7) {
        if (failed(iris_volume_read_nifti(argv[6], 1, &s.truth), "reading the truth labels") ||
            view_of(s.truth, &truth, "iris_volume_view")) {
            goto done;
        }
        for (k = 0; k < count; k++) {
            double dice = 0.0;
            IrisStatus st = iris_dice(&result, &truth, s.values[k], &dice);
            if (st == IRIS_ERROR_EMPTY_MASK) {
                printf("label %u: absent from both\n", (unsigned)s.values[k]);
            } else if (failed(st, "iris_dice")) {
                goto done;
            } else {
                printf("label %u: Dice %.4f\n", (unsigned)s.values[k], dice);
            }
        }
    }
    status = 0;
done:
    release(&s);
    return status;
}
