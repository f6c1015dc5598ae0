/* Decode only a crop of a JPEG, with libjpeg-turbo: the rows above it are skipped
 * (jpeg_skip_scanlines: entropy-decoded, not inverse-transformed), decoding stops after its
 * last row, and only the iMCU columns it spans are inverse-transformed (jpeg_crop_scanline).
 * This is what TensorFlow's decode_and_crop_jpeg does for big_vision's inception crop.
 *
 * Built and loaded with ctypes by pipeline/data/jpeg.py. Any libjpeg error or warning
 * (corrupt or truncated data) returns -1 with the message, and the caller decodes the image
 * the slow way, which decides whether it is readable.
 */
#include <setjmp.h>
#include <stdio.h>
#include <string.h>

#include <jpeglib.h>

#define MESSAGE_SIZE 200

struct error_manager {
  struct jpeg_error_mgr base;
  jmp_buf escape;
  char *message;
};

static void on_error(j_common_ptr cinfo) {
  struct error_manager *err = (struct error_manager *)cinfo->err;
  char text[JMSG_LENGTH_MAX];
  (*cinfo->err->format_message)(cinfo, text);
  snprintf(err->message, MESSAGE_SIZE, "%s", text);
  longjmp(err->escape, 1);
}

static void on_message(j_common_ptr cinfo, int level) {
  if (level < 0) on_error(cinfo); /* a warning: corrupt data; let the slow path judge it */
}

static void report_errors(struct jpeg_decompress_struct *cinfo, struct error_manager *err,
                          char *message) {
  cinfo->err = jpeg_std_error(&err->base);
  err->base.error_exit = on_error;
  err->base.emit_message = on_message;
  err->message = message;
}

static void read_header(struct jpeg_decompress_struct *cinfo, const unsigned char *data,
                        unsigned long size) {
  jpeg_create_decompress(cinfo);
  jpeg_mem_src(cinfo, data, size);
  jpeg_read_header(cinfo, TRUE);
}

/* Header only: info = (width, height, components). */
int tessera_jpeg_info(const unsigned char *data, unsigned long size, int *info, char *message) {
  struct jpeg_decompress_struct cinfo;
  struct error_manager err;
  report_errors(&cinfo, &err, message);
  if (setjmp(err.escape)) { /* here from on_error, in this frame: setjmp cannot be in a helper */
    jpeg_destroy_decompress(&cinfo);
    return -1;
  }
  read_header(&cinfo, data, size);
  info[0] = (int)cinfo.image_width;
  info[1] = (int)cinfo.image_height;
  info[2] = cinfo.num_components;
  jpeg_destroy_decompress(&cinfo);
  return 0;
}

/* The frame header's info = (width, height, components), found by walking the segments before
 * it, without setting up a decompressor (which also parses every table: a third of a small
 * image's crop decode). -1 where the walk does not reach a frame header with a height; the
 * caller then asks libjpeg (tessera_jpeg_info), which says what is wrong. */
int tessera_jpeg_frame(const unsigned char *data, unsigned long size, int *info) {
  unsigned long i = 2; /* after SOI */
  while (i + 4 <= size) {
    if (data[i] != 0xFF) return -1;
    unsigned char marker = data[i + 1];
    if (marker == 0xFF) { /* a fill byte */
      i += 1;
      continue;
    }
    if (marker == 0x01 || (marker >= 0xD0 && marker <= 0xD8)) { /* no length: TEM, RSTn, SOI */
      i += 2;
      continue;
    }
    unsigned long length = ((unsigned long)data[i + 2] << 8) | data[i + 3];
    if (length < 2 || marker == 0xDA || marker == 0xD9) return -1; /* a scan before a frame */
    /* SOF0-SOF15, except DHT (C4), JPG (C8) and DAC (CC) */
    if (marker >= 0xC0 && marker <= 0xCF && marker != 0xC4 && marker != 0xC8 && marker != 0xCC) {
      if (length < 8 || i + 10 > size) return -1;
      info[1] = (data[i + 5] << 8) | data[i + 6];
      info[0] = (data[i + 7] << 8) | data[i + 8];
      info[2] = data[i + 9];
      return info[0] > 0 && info[1] > 0 && info[2] > 0 ? 0 : -1;
    }
    i += 2 + length;
  }
  return -1;
}

/* Decode rows [top, bottom) and at least columns [left, right) of the image scaled by
 * 1/denom (1, 2, 4 or 8) as 1 (grey) or 3 (RGB) channels. Row r of the crop is written to
 * out + r * out_width * channels, each pixel at its own column, so out holds
 * (bottom - top, out_width, channels) bytes and out_width must be the scaled image's width.
 * One column more on each side is decoded than asked for: chroma upsampling treats the edge of
 * a cropped scanline as the image's edge, and the neighbour makes the asked-for columns equal
 * to a full decode's. With `flip`, columns [left, right) of each row are mirrored as it is
 * decoded, while the row is in cache: a horizontal flip before the resize, which the resize's
 * symmetric filter makes the same as one after it. */
static void swap_pixels(unsigned char *a, unsigned char *b, int channels) {
  for (int c = 0; c < channels; c++) {
    unsigned char t = a[c];
    a[c] = b[c];
    b[c] = t;
  }
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <tmmintrin.h>
#define MIRROR_SIMD 1

/* 16 RGB pixels (48 bytes in s0, s1, s2) in reverse order: output byte o takes input byte
 * 45 - 3 * (o / 3) + o % 3, which lies in one or two of the input vectors (0x80: zero). */
__attribute__((target("ssse3"))) static void reverse16(__m128i *out, const unsigned char *in) {
  const __m128i s0 = _mm_loadu_si128((const __m128i *)in);
  const __m128i s1 = _mm_loadu_si128((const __m128i *)(in + 16));
  const __m128i s2 = _mm_loadu_si128((const __m128i *)(in + 32));
  out[0] = _mm_or_si128(
      _mm_shuffle_epi8(s1, _mm_setr_epi8(-128, -128, -128, -128, -128, -128, -128, -128, -128,
                                         -128, -128, -128, -128, -128, -128, 14)),
      _mm_shuffle_epi8(s2, _mm_setr_epi8(13, 14, 15, 10, 11, 12, 7, 8, 9, 4, 5, 6, 1, 2, 3, -128)));
  out[1] = _mm_or_si128(
      _mm_or_si128(_mm_shuffle_epi8(s0, _mm_setr_epi8(-128, -128, -128, -128, -128, -128, -128,
                                                      -128, -128, -128, -128, -128, -128, -128,
                                                      15, -128)),
                   _mm_shuffle_epi8(s1, _mm_setr_epi8(15, -128, 11, 12, 13, 8, 9, 10, 5, 6, 7, 2,
                                                      3, 4, -128, 0))),
      _mm_shuffle_epi8(s2, _mm_setr_epi8(-128, 0, -128, -128, -128, -128, -128, -128, -128, -128,
                                         -128, -128, -128, -128, -128, -128)));
  out[2] = _mm_or_si128(
      _mm_shuffle_epi8(s0, _mm_setr_epi8(-128, 12, 13, 14, 9, 10, 11, 6, 7, 8, 3, 4, 5, 0, 1, 2)),
      _mm_shuffle_epi8(s1, _mm_setr_epi8(1, -128, -128, -128, -128, -128, -128, -128, -128, -128,
                                         -128, -128, -128, -128, -128, -128)));
}

/* Swaps the row's first and last 16 RGB pixels, reversed, then the next 16 from each end, while
 * 32 or more are left between them; returns how many were done at each end. */
__attribute__((target("ssse3"))) static int mirror_rgb_blocks(unsigned char *row, int pixels) {
  unsigned char *a = row, *b = row + (size_t)pixels * 3;
  while (b - a >= 96) {
    __m128i left[3], right[3];
    reverse16(left, a);
    reverse16(right, b - 48);
    for (int i = 0; i < 3; i++) {
      _mm_storeu_si128((__m128i *)(a + 16 * i), right[i]);
      _mm_storeu_si128((__m128i *)(b - 48 + 16 * i), left[i]);
    }
    a += 48;
    b -= 48;
  }
  return (int)((a - row) / 3);
}
#endif

/* Pixels [0, pixels) of a row in reverse order, in place. RGB rows go 16 pixels at a time
 * (SSSE3 byte shuffles, where the CPU has them): a swap byte by byte cost a third of the
 * crop's decode. */
static void mirror(unsigned char *row, int pixels, int channels) {
  int done = 0; /* pixels mirrored at each end */
#ifdef MIRROR_SIMD
  if (channels == 3 && __builtin_cpu_supports("ssse3")) done = mirror_rgb_blocks(row, pixels);
#endif
  unsigned char *a = row + (size_t)done * channels;
  unsigned char *b = row + (size_t)(pixels - 1 - done) * channels;
  for (; a < b; a += channels, b -= channels) swap_pixels(a, b, channels);
}

int tessera_jpeg_decode_crop(const unsigned char *data, unsigned long size, int denom,
                             int channels, int left, int top, int right, int bottom, int flip,
                             unsigned char *out, int out_width, char *message) {
  struct jpeg_decompress_struct cinfo;
  struct error_manager err;
  report_errors(&cinfo, &err, message);
  if (setjmp(err.escape)) { /* here from on_error, in this frame: setjmp cannot be in a helper */
    jpeg_destroy_decompress(&cinfo);
    return -1;
  }
  read_header(&cinfo, data, size);
  cinfo.scale_num = 1;
  cinfo.scale_denom = (unsigned int)denom;
  cinfo.out_color_space = channels == 1 ? JCS_GRAYSCALE : JCS_RGB;
  jpeg_start_decompress(&cinfo);
  if ((int)cinfo.output_width != out_width || (int)cinfo.output_components != channels ||
      left < 0 || top < 0 || right > out_width || bottom > (int)cinfo.output_height ||
      left >= right || top >= bottom) {
    snprintf(message, MESSAGE_SIZE, "crop (%d, %d, %d, %d) is not inside the %ux%u image", left,
             top, right, bottom, cinfo.output_width, cinfo.output_height);
    jpeg_destroy_decompress(&cinfo);
    return -1;
  }
  JDIMENSION x = left > 0 ? (JDIMENSION)(left - 1) : 0;
  JDIMENSION width = (JDIMENSION)((right < out_width ? right + 1 : right)) - x;
  jpeg_crop_scanline(&cinfo, &x, &width); /* widens to iMCU boundaries */
  if (top > 0) jpeg_skip_scanlines(&cinfo, (JDIMENSION)top);
  size_t stride = (size_t)out_width * (size_t)channels;
  while ((int)cinfo.output_scanline < bottom) {
    JSAMPROW row = out + (cinfo.output_scanline - (JDIMENSION)top) * stride + x * channels;
    jpeg_read_scanlines(&cinfo, &row, 1);
    if (flip) mirror(row + (left - (int)x) * channels, right - left, channels);
  }
  jpeg_abort_decompress(&cinfo);
  jpeg_destroy_decompress(&cinfo);
  return 0;
}
