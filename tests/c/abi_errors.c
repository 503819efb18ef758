/* SPDX-License-Identifier: MIT OR Apache-2.0 */
/*
 * abi_errors: feeds libiris, through the real shared library, the mistakes
 * a C caller makes (NULLs, zero and overflowing dims, short buffers,
 * corrupt and truncated embeddings, an embedding of another model, labels
 * that do not fit) and checks that each returns its status code with a
 * useful message, that failed constructors leave NULL behind, and that the
 * error message is kept per thread.
 *
 *   abi_errors MODEL_DIR DATA_DIR
 *
 * DATA_DIR holds ref.nii.gz, ref_labels.nii.gz, query.nii.gz and
 * foreign.irisemb (a task embedding of another model). Prints one line per
 * check and ends with "N passed, M failed"; exits non-zero on any failure.
 */
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "iris.h"

static int passed, failures;

/* Checks a status and that the message contains `word` (NULL: non-empty). */
static void expect(const char *what, IrisStatus got, IrisStatus want, const char *word) {
    const char *message = iris_last_error();
    int ok = got == want;
    if (want != IRIS_OK) {
        ok = ok && message[0] != '\0' && (word == NULL || strstr(message, word) != NULL);
    }
    printf("%s %s: %s%s%s%s\n", ok ? "ok  " : "FAIL", what, iris_status_name((int)got),
           got == IRIS_OK ? "" : " (", got == IRIS_OK ? "" : message, got == IRIS_OK ? "" : ")");
    if (!ok) {
        printf("     expected %s with a message containing \"%s\"\n", iris_status_name((int)want),
               word ? word : "");
        failures++;
    } else {
        passed++;
    }
}

static void check(const char *what, int condition) {
    printf("%s %s\n", condition ? "ok  " : "FAIL", what);
    if (condition) {
        passed++;
    } else {
        failures++;
    }
}

static char *path_in(const char *dir, const char *file) {
    size_t n = strlen(dir) + strlen(file) + 2;
    char *p = malloc(n);
    if (p != NULL) {
        snprintf(p, n, "%s/%s", dir, file);
    }
    return p;
}

static IrisVolumeView u8_view(const uint8_t *data, uint64_t d, uint64_t h, uint64_t w) {
    IrisVolumeView v;
    memset(&v, 0, sizeof v);
    v.struct_size = sizeof v;
    v.dtype = IRIS_DATA_TYPE_U8;
    v.dims[0] = d;
    v.dims[1] = h;
    v.dims[2] = w;
    v.spacing_mm[0] = v.spacing_mm[1] = v.spacing_mm[2] = 1.0;
    v.data = data;
    v.data_bytes = d * h * w;
    return v;
}

static void *fail_in_thread(void *path) {
    IrisTask *task = NULL;
    if (iris_task_load((const char *)path, &task) != IRIS_ERROR_IO) {
        return NULL;
    }
    /* Read before this thread's next iris call, which may replace it. */
    return strstr(iris_last_error(), (const char *)path) ? (void *)path : NULL;
}

static void versions(void) {
    expect("iris_check_abi(IRIS_ABI_VERSION)", iris_check_abi(IRIS_ABI_VERSION), IRIS_OK, NULL);
    expect("iris_check_abi(next major)", iris_check_abi(IRIS_ABI_VERSION + (1u << 16)),
           IRIS_ERROR_VERSION, "ABI");
    check("iris_version() matches the header",
          iris_version() ==
              ((IRIS_VERSION_MAJOR << 16) | (IRIS_VERSION_MINOR << 8) | IRIS_VERSION_PATCH));
    check("iris_version_string() is set", iris_version_string()[0] != '\0');
    check("iris_status_name(IRIS_ERROR_SHAPE)",
          strcmp(iris_status_name(IRIS_ERROR_SHAPE), "IRIS_ERROR_SHAPE") == 0);
    check("iris_status_name(unknown)", strcmp(iris_status_name(999), "IRIS_ERROR_UNKNOWN") == 0);
}

static void nulls_and_frees(void) {
    IrisModel *model = NULL;
    IrisTask *task = (IrisTask *)&passed; /* not NULL: a failure must reset it */
    IrisVolume *volume = NULL;
    size_t count = 0;

    expect("iris_model_load(NULL dir)", iris_model_load(NULL, &model), IRIS_ERROR_NULL_POINTER,
           "dir");
    expect("iris_task_load(path, NULL out)", iris_task_load("x.irisemb", NULL),
           IRIS_ERROR_NULL_POINTER, "out");
    expect("iris_task_load_buffer(NULL, 5)", iris_task_load_buffer(NULL, 5, &task),
           IRIS_ERROR_NULL_POINTER, "data");
    check("a failed constructor sets *out = NULL", task == NULL);
    expect("iris_task_num_classes(NULL task)", iris_task_num_classes(NULL, &count),
           IRIS_ERROR_NULL_POINTER, "task");
    expect("iris_volume_read_nifti(NULL path)", iris_volume_read_nifti(NULL, 0, &volume),
           IRIS_ERROR_NULL_POINTER, "path");
    iris_model_free(NULL);
    iris_task_free(NULL);
    iris_volume_free(NULL);
    iris_model_free(&model);
    iris_task_free(&task);
    iris_volume_free(&volume);
    check("free(NULL) and free(&NULL) are no-ops", model == NULL && task == NULL);
}

static void views(void) {
    uint8_t data[64];
    IrisVolumeView good, bad;
    double dice = -1.0;
    memset(data, 1, sizeof data);
    good = u8_view(data, 4, 4, 4);

    expect("Dice of a map with itself", iris_dice(&good, &good, 1, &dice), IRIS_OK, NULL);
    check("Dice of a map with itself is 1", dice == 1.0);
    bad = good;
    bad.dims[2] = 0;
    expect("zero dim", iris_dice(&bad, &good, 1, &dice), IRIS_ERROR_INVALID_ARGUMENT,
           "dimension 2 is zero");
    bad = good;
    bad.dims[0] = UINT64_MAX;
    expect("dims that overflow", iris_dice(&bad, &good, 1, &dice), IRIS_ERROR_TOO_LARGE, "dims");
    bad = good;
    bad.data_bytes = 10;
    expect("short data buffer", iris_dice(&good, &bad, 1, &dice), IRIS_ERROR_BUFFER_TOO_SMALL,
           "expected 64 bytes, got 10");
    bad = good;
    bad.struct_size = 4;
    expect("struct_size too small", iris_dice(&bad, &good, 1, &dice),
           IRIS_ERROR_INVALID_ARGUMENT, "struct_size");
    bad = good;
    bad.dtype = 77;
    expect("unknown dtype", iris_dice(&bad, &good, 1, &dice), IRIS_ERROR_INVALID_ARGUMENT,
           "dtype");
    bad = good;
    bad.data = NULL;
    expect("NULL data", iris_dice(&bad, &good, 1, &dice), IRIS_ERROR_NULL_POINTER, "data");
}

static void embeddings(IrisModel *model, IrisTask *task, const char *data_dir) {
    size_t needed = 0, written = 0, count = 0;
    uint8_t *bytes;
    IrisTask *back = NULL, *foreign = NULL;
    char *path = path_in(data_dir, "foreign.irisemb");

    expect("iris_task_save_buffer size query", iris_task_save_buffer(task, NULL, 0, &needed),
           IRIS_ERROR_BUFFER_TOO_SMALL, "expected");
    check("the size query reports the bytes needed", needed > 32);
    bytes = malloc(needed);
    if (bytes == NULL || path == NULL) {
        check("malloc", 0);
        free(bytes);
        free(path);
        return;
    }
    expect("iris_task_save_buffer", iris_task_save_buffer(task, bytes, needed, &written), IRIS_OK,
           NULL);
    expect("iris_task_load_buffer round trip", iris_task_load_buffer(bytes, written, &back),
           IRIS_OK, NULL);
    expect("iris_task_num_classes", iris_task_num_classes(back, &count), IRIS_OK, NULL);
    check("the round trip keeps the classes", count >= 1);
    iris_task_free(&back);

    expect("truncated embedding", iris_task_load_buffer(bytes, written - 1, &back),
           IRIS_ERROR_FORMAT, "truncated");
    expect("empty embedding", iris_task_load_buffer(bytes, 0, &back), IRIS_ERROR_FORMAT, NULL);
    bytes[written / 2] ^= 0x5a;
    expect("corrupt embedding", iris_task_load_buffer(bytes, written, &back), IRIS_ERROR_FORMAT,
           "checksum");
    check("no task is made from bad bytes", back == NULL);

    expect("iris_task_load(foreign.irisemb)", iris_task_load(path, &foreign), IRIS_OK, NULL);
    expect("iris_task_check_model(foreign)", iris_task_check_model(foreign, model),
           IRIS_ERROR_MODEL_MISMATCH, "another model");
    expect("iris_task_check_model(own)", iris_task_check_model(task, model), IRIS_OK, NULL);
    iris_task_free(&foreign);
    free(bytes);
    free(path);
}

static void segmenting(IrisModel *model, IrisTask *task, const IrisVolumeView *query,
                       const char *data_dir) {
    uint64_t voxels = query->dims[0] * query->dims[1] * query->dims[2];
    uint16_t *labels = malloc(voxels * sizeof *labels);
    char *path = path_in(data_dir, "foreign.irisemb");
    IrisTask *foreign = NULL;
    IrisSegmentOptions options;
    float probability = 0.0f;

    if (labels == NULL || path == NULL) {
        check("malloc", 0);
        free(labels);
        free(path);
        return;
    }
    expect("short labels_out", iris_segment(model, query, task, NULL, IRIS_DATA_TYPE_U16, labels,
                                            voxels * 2 - 1, NULL, 0),
           IRIS_ERROR_BUFFER_TOO_SMALL, "labels_out");
    expect("short probabilities_out", iris_segment(model, query, task, NULL, IRIS_DATA_TYPE_U16,
                                                   labels, voxels * 2, &probability, 1),
           IRIS_ERROR_BUFFER_TOO_SMALL, "probabilities_out");
    expect("label dtype F32", iris_segment(model, query, task, NULL, IRIS_DATA_TYPE_F32, labels,
                                           voxels * 4, NULL, 0),
           IRIS_ERROR_INVALID_ARGUMENT, "label_dtype");
    iris_segment_options_default(&options);
    options.threshold = 2.0f;
    expect("threshold 2", iris_segment(model, query, task, &options, IRIS_DATA_TYPE_U16, labels,
                                       voxels * 2, NULL, 0),
           IRIS_ERROR_INVALID_ARGUMENT, "threshold");
    iris_segment_options_default(&options);
    options.reserved[0] = 1;
    expect("non-zero reserved", iris_segment(model, query, task, &options, IRIS_DATA_TYPE_U16,
                                             labels, voxels * 2, NULL, 0),
           IRIS_ERROR_INVALID_ARGUMENT, "reserved[0]");
    if (iris_task_load(path, &foreign) == IRIS_OK) {
        expect("segment with another model's task",
               iris_segment(model, query, foreign, NULL, IRIS_DATA_TYPE_U16, labels, voxels * 2,
                            NULL, 0),
               IRIS_ERROR_MODEL_MISMATCH, "another model");
    }
    iris_task_free(&foreign);
    free(labels);
    free(path);
}

static void pools(IrisModel *model, IrisTask *task, const IrisVolumeView *query) {
    uint64_t voxels = query->dims[0] * query->dims[1] * query->dims[2];
    uint8_t *labels = malloc(voxels);
    IrisPool *pool = NULL;
    IrisTask *used = NULL;
    IrisRetrieveOptions options;
    size_t size = 7;

    if (labels == NULL) {
        check("malloc", 0);
        return;
    }
    expect("iris_pool_new(NULL)", iris_pool_new(NULL), IRIS_ERROR_NULL_POINTER, "out");
    expect("iris_pool_new", iris_pool_new(&pool), IRIS_OK, NULL);
    expect("retrieve from an empty pool",
           iris_retrieve(model, pool, query, NULL, 0, NULL, NULL, IRIS_DATA_TYPE_U8, labels,
                         voxels, NULL, 0, &used),
           IRIS_ERROR_INVALID_ARGUMENT, "pool holds 0");
    check("a failed retrieve sets *task_out = NULL", used == NULL);
    expect("add to a NULL pool", iris_pool_add_task(NULL, "a", task), IRIS_ERROR_NULL_POINTER,
           "pool");
    expect("add with a NULL name", iris_pool_add_task(pool, NULL, task), IRIS_ERROR_NULL_POINTER,
           "name");
    expect("iris_pool_add_task", iris_pool_add_task(pool, "reference", task), IRIS_OK, NULL);
    expect("iris_pool_size", iris_pool_size(pool, &size), IRIS_OK, NULL);
    check("the pool holds one reference", size == 1);
    iris_retrieve_options_default(&options);
    options.level = IRIS_RETRIEVAL_LEVEL_IMAGE;
    expect("image level on a task without a descriptor",
           iris_retrieve(model, pool, query, NULL, 0, &options, NULL, IRIS_DATA_TYPE_U8, labels,
                         voxels, NULL, 0, NULL),
           IRIS_ERROR_INVALID_ARGUMENT, "descriptor");
    iris_retrieve_options_default(&options);
    options.top_k = 0;
    expect("top_k 0",
           iris_retrieve(model, pool, query, NULL, 0, &options, NULL, IRIS_DATA_TYPE_U8, labels,
                         voxels, NULL, 0, NULL),
           IRIS_ERROR_INVALID_ARGUMENT, "top_k");
    expect("short labels_out",
           iris_retrieve(model, pool, query, NULL, 0, NULL, NULL, IRIS_DATA_TYPE_U8, labels,
                         voxels - 1, NULL, 0, NULL),
           IRIS_ERROR_BUFFER_TOO_SMALL, "labels_out");
    expect("object-level retrieve",
           iris_retrieve(model, pool, query, NULL, 0, NULL, NULL, IRIS_DATA_TYPE_U8, labels,
                         voxels, NULL, 0, &used),
           IRIS_OK, NULL);
    check("the retrieved task is returned", used != NULL);
    iris_task_free(&used);
    iris_pool_free(&pool);
    iris_pool_free(&pool);
    check("iris_pool_free nulls the pointer", pool == NULL);
    free(labels);
}

static void threads(void) {
    pthread_t a, b;
    void *ra = NULL, *rb = NULL;
    const char *pa = "/nonexistent/first.irisemb", *pb = "/nonexistent/second.irisemb";
    check("threads start", pthread_create(&a, NULL, fail_in_thread, (void *)pa) == 0 &&
                               pthread_create(&b, NULL, fail_in_thread, (void *)pb) == 0);
    pthread_join(a, &ra);
    pthread_join(b, &rb);
    check("each thread sees its own error message", ra == pa && rb == pb);
}

/* The whole file at `path` in a malloc'ed buffer (NULL on failure). */
static unsigned char *read_all(const char *path, size_t *len) {
    FILE *f = fopen(path, "rb");
    unsigned char *bytes = NULL;
    long n;
    if (f != NULL && fseek(f, 0, SEEK_END) == 0 && (n = ftell(f)) > 0 &&
        fseek(f, 0, SEEK_SET) == 0 && (bytes = malloc((size_t)n)) != NULL) {
        *len = fread(bytes, 1, (size_t)n, f);
    }
    if (f != NULL) {
        fclose(f);
    }
    return bytes;
}

/* ABI 0.3: a model's threads, a model from memory, a reading budget; ABI 0.4: its precision. */
static void loading(const char *model_dir, const char *labels_path) {
    static const char *names[4] = {"manifest.json", "encoder.onnx", "task_encoder.onnx",
                                   "decoder.onnx"};
    unsigned char *files[4];
    size_t lens[4] = {0, 0, 0, 0};
    IrisModelOptions options;
    IrisModelBuffers buffers;
    IrisReadOptions read_options;
    IrisModel *model = NULL;
    IrisVolume *volume = NULL;
    uint32_t threads = 0, precision = 0;
    int i;

    expect("iris_model_options_default", iris_model_options_default(&options), IRIS_OK, NULL);
    options.threads = 1;
    expect("iris_model_load_with(1 thread)", iris_model_load_with(model_dir, &options, &model),
           IRIS_OK, NULL);
    expect("iris_model_threads", iris_model_threads(model, &threads), IRIS_OK, NULL);
    check("the model has the 1 thread asked for", threads == 1);
    expect("iris_model_precision", iris_model_precision(model, &precision), IRIS_OK, NULL);
    check("the default precision is f32", precision == IRIS_PRECISION_F32);
    iris_model_free(&model);

    /* ABI 0.4: bfloat16 products where the CPU has them, f32 elsewhere. */
    options.precision = IRIS_PRECISION_BF16;
    expect("iris_model_load_with(bf16)", iris_model_load_with(model_dir, &options, &model), IRIS_OK,
           NULL);
    expect("iris_model_precision(bf16)", iris_model_precision(model, &precision), IRIS_OK, NULL);
    check("a bf16 model runs bf16 or f32",
          precision == IRIS_PRECISION_BF16 || precision == IRIS_PRECISION_F32);
    iris_model_free(&model);
    options.precision = 7;
    expect("iris_model_load_with(precision 7)", iris_model_load_with(model_dir, &options, &model),
           IRIS_ERROR_INVALID_ARGUMENT, "precision");
    options.precision = IRIS_PRECISION_F32;
    options.reserved0 = 1;
    expect("iris_model_load_with(reserved0 1)", iris_model_load_with(model_dir, &options, &model),
           IRIS_ERROR_INVALID_ARGUMENT, "reserved0");
    options.reserved0 = 0;
    check("a refused load sets *out = NULL", model == NULL);
    expect("iris_model_precision(NULL)", iris_model_precision(NULL, &precision),
           IRIS_ERROR_NULL_POINTER, "model");

    for (i = 0; i < 4; i++) {
        char *path = path_in(model_dir, names[i]);
        files[i] = path ? read_all(path, &lens[i]) : NULL;
        free(path);
    }
    memset(&buffers, 0, sizeof buffers);
    buffers.struct_size = sizeof buffers;
    buffers.manifest = files[0];
    buffers.manifest_len = lens[0];
    buffers.encoder = files[1];
    buffers.encoder_len = lens[1];
    buffers.task_encoder = files[2];
    buffers.task_encoder_len = lens[2];
    buffers.decoder = files[3];
    buffers.decoder_len = lens[3];
    expect("iris_model_load_buffers", iris_model_load_buffers(&buffers, NULL, &model), IRIS_OK,
           NULL);
    for (i = 0; i < 4; i++) {
        free(files[i]); /* the library keeps its own copy */
    }
    expect("the model from memory works", iris_model_threads(model, &threads), IRIS_OK, NULL);
    iris_model_free(&model);
    buffers.decoder = NULL;
    expect("iris_model_load_buffers(NULL decoder)", iris_model_load_buffers(&buffers, NULL, &model),
           IRIS_ERROR_NULL_POINTER, "buffers.decoder");
    check("a failed load sets *out = NULL", model == NULL);

    expect("iris_read_options_default", iris_read_options_default(&read_options), IRIS_OK, NULL);
    read_options.memory_budget = 16;
    expect("iris_volume_read_nifti_with(16-byte budget)",
           iris_volume_read_nifti_with(labels_path, 1, &read_options, &volume),
           IRIS_ERROR_TOO_LARGE, "budget");
    check("a refused read sets *out = NULL", volume == NULL);
}

int main(int argc, char **argv) {
    IrisModel *model = NULL;
    IrisVolume *ref = NULL, *ref_labels = NULL, *query = NULL;
    IrisVolumeView ref_view, labels_view, query_view;
    IrisTask *task = NULL;
    const uint16_t label = 1;
    char *paths[3];
    int i;

    if (argc != 3) {
        fprintf(stderr, "usage: abi_errors MODEL_DIR DATA_DIR\n");
        return 2;
    }
    versions();
    nulls_and_frees();
    views();
    threads();

    paths[0] = path_in(argv[2], "ref.nii.gz");
    paths[1] = path_in(argv[2], "ref_labels.nii.gz");
    paths[2] = path_in(argv[2], "query.nii.gz");
    memset(&ref_view, 0, sizeof ref_view);
    ref_view.struct_size = sizeof ref_view;
    labels_view = query_view = ref_view;
    loading(argv[1], paths[1]);
    expect("iris_model_load", iris_model_load(argv[1], &model), IRIS_OK, NULL);
    expect("read ref", iris_volume_read_nifti(paths[0], 0, &ref), IRIS_OK, NULL);
    expect("read ref labels", iris_volume_read_nifti(paths[1], 1, &ref_labels), IRIS_OK, NULL);
    expect("read query", iris_volume_read_nifti(paths[2], 0, &query), IRIS_OK, NULL);
    if (model && ref && ref_labels && query &&
        iris_volume_view(ref, &ref_view) == IRIS_OK &&
        iris_volume_view(ref_labels, &labels_view) == IRIS_OK &&
        iris_volume_view(query, &query_view) == IRIS_OK) {
        IrisTask *none = (IrisTask *)&passed;
        expect("encode with count 0",
               iris_task_encode(model, &ref_view, &labels_view, &label, NULL, 0, NULL, &none),
               IRIS_ERROR_INVALID_ARGUMENT, "count");
        check("a failed encode sets *out = NULL", none == NULL);
        expect("encode the image as its own labels",
               iris_task_encode(model, &ref_view, &query_view, &label, NULL, 1, NULL, &none),
               IRIS_ERROR_INVALID_ARGUMENT, "labels");
        expect("iris_task_encode", iris_task_encode(model, &ref_view, &labels_view, &label, NULL,
                                                    1, NULL, &task),
               IRIS_OK, NULL);
        if (task != NULL) {
            embeddings(model, task, argv[2]);
            segmenting(model, task, &query_view, argv[2]);
            pools(model, task, &query_view);
        }
    }
    iris_task_free(&task);
    iris_volume_free(&ref);
    iris_volume_free(&ref_labels);
    iris_volume_free(&query);
    iris_model_free(&model);
    for (i = 0; i < 3; i++) {
        free(paths[i]);
    }
    printf("abi_errors: %d passed, %d failed\n", passed, failures);
    return failures == 0 ? 0 : 1;
}
