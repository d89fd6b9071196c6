/* Token files in llm.c's format: a header of 256 little-endian int32
 * (header[0] = 20240520 magic, header[1] = 1 version: uint16 tokens,
 * header[2] = token count), then the tokens as little-endian uint16. */
#ifndef PLASA_TRAIN_TOKENS_H
#define PLASA_TRAIN_TOKENS_H

#include <stddef.h>
#include <stdint.h>

#define TOKFILE_MAGIC 20240520
#define TOKFILE_VERSION 1
#define TOKFILE_HEADER_BYTES 1024

int tokfile_write(const char *path, const uint16_t *tok, int64_t n);
/* Reads path into a malloc'd *tok of *n tokens. Checks the magic, the
 * version, that the file holds exactly the announced tokens (neither
 * truncated nor followed by extra bytes) and, if vocab > 0, that every id
 * is < vocab. */
int tokfile_read(const char *path, int vocab, uint16_t **tok, int64_t *n);
/* The same for a file's bytes held in memory (path names it in messages). */
int tokfile_parse(const void *data, size_t len, const char *path, int vocab, uint16_t **tok,
                  int64_t *n);
/* Index of the first id >= vocab, or -1; *max_id = the largest id (0 if n = 0). */
int64_t tokfile_check_vocab(const uint16_t *tok, int64_t n, int vocab, int *max_id);
/* int32 ids (each in [0, 65536)) to a malloc'd uint16 array. */
int tokfile_narrow(const int32_t *ids, size_t n, uint16_t **out);

#endif
