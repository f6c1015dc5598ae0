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

/* Decode rows [top, bottom) and at least columns [left, right) of the image scaled by
 * 1/denom (1, 2, 4 or 8) as 1 (grey) or 3 (RGB) channels. Row r of the crop is written to
 * out + r * out_width * channels, each pixel at its own column, so out holds
 * (bottom - top, out_width, channels) bytes and out_width must be the scaled image's width.
 * One column more on each side is decoded than asked for: chroma upsampling treats the edge of
 * a cropped scanline as the image's edge, and the neighbour makes the asked-for columns equal
 * to a full decode's. */
int tessera_jpeg_decode_crop(const unsigned char *data, unsigned long size, int denom,
                             int channels, int left, int top, int right, int bottom,
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
  }
  jpeg_abort_decompress(&cinfo);
  jpeg_destroy_decompress(&cinfo);
  return 0;
}
