#include "plot.hpp"

#include <gd.h>
#include <gdfontmb.h>
#include <gdfonts.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <limits>
#include <memory>

#include "kept/core/error.hpp"
#include "kept/io/atomic_file.hpp"

namespace kept::cli {
namespace {

// Colour-blind-safe palette (Okabe-Ito).
constexpr int kPalette[][3] = {{0, 114, 178}, {213, 94, 0},   {0, 158, 115}, {204, 121, 167},
                               {230, 159, 0}, {86, 180, 233}, {0, 0, 0},     {240, 228, 66}};

struct Range {
  double low = std::numeric_limits<double>::infinity(),
         high = -std::numeric_limits<double>::infinity();
  void add(double value) {
    low = std::min(low, value);
    high = std::max(high, value);
  }
  bool empty() const { return !(low <= high); }
};

// About `count` round tick values covering [low, high].
std::vector<double> linear_ticks(double low, double high, int count) {
  const double span = high - low;
  const double raw = span / std::max(count, 1);
  const double magnitude = std::pow(10.0, std::floor(std::log10(raw)));
  double step = magnitude;
  for (double factor : {1.0, 2.0, 5.0, 10.0})
    if (magnitude * factor >= raw) {
      step = magnitude * factor;
      break;
    }
  std::vector<double> ticks;
  for (double tick = std::ceil(low / step) * step; tick <= high + step * 1e-9; tick += step)
    ticks.push_back(std::fabs(tick) < step * 1e-9 ? 0.0 : tick);
  return ticks;
}

std::string format_tick(double value) {
  char text[32];
  if (value != 0 && (std::fabs(value) >= 1e5 || std::fabs(value) < 1e-3))
    std::snprintf(text, sizeof text, "%.0e", value);
  else
    std::snprintf(text, sizeof text, "%g", value);
  return text;
}

void draw_string(gdImagePtr image, gdFontPtr font, int x, int y, const std::string& text,
                 int color) {
  gdImageString(image, font, x, y,
                reinterpret_cast<unsigned char*>(const_cast<char*>(text.c_str())), color);
}

void draw_panel(gdImagePtr image, const Chart& chart, int top, int width, int height) {
  const int black = gdImageColorResolve(image, 0, 0, 0);
  const int grid = gdImageColorResolve(image, 225, 225, 225);
  const int left = 78, right = width - 20, plot_top = top + 34, bottom = top + height - 46;
  gdFontPtr font = gdFontGetSmall(), title_font = gdFontGetMediumBold();

  draw_string(image, title_font, left, top + 10, chart.title, black);
  auto transform_y = [&](double y) { return chart.log_y ? std::log10(y) : y; };
  Range xr, yr;
  for (const Series& s : chart.series)
    for (std::size_t i = 0; i < s.x.size() && i < s.y.size(); ++i) {
      if (!std::isfinite(s.x[i]) || !std::isfinite(s.y[i]) || (chart.log_y && s.y[i] <= 0))
        continue;
      xr.add(s.x[i]);
      yr.add(transform_y(s.y[i]));
    }
  gdImageRectangle(image, left, plot_top, right, bottom, black);
  if (xr.empty()) {
    draw_string(image, font, left + 10, plot_top + 10, "(no data)", black);
    return;
  }
  if (chart.x_low < chart.x_high) {
    xr.low = std::min(xr.low, chart.x_low);
    xr.high = std::max(xr.high, chart.x_high);
  }
  if (xr.high == xr.low) xr.high = xr.low + 1;
  if (yr.high == yr.low) {
    yr.low -= chart.log_y ? 0.5 : std::max(1e-12, std::fabs(yr.low) * 0.1);
    yr.high += chart.log_y ? 0.5 : std::max(1e-12, std::fabs(yr.high) * 0.1);
  }
  const double pad = (yr.high - yr.low) * 0.05;
  yr.low -= pad;
  yr.high += pad;
  auto px = [&](double x) {
    return left + static_cast<int>((x - xr.low) / (xr.high - xr.low) * (right - left));
  };
  auto py = [&](double y) {
    return bottom -
           static_cast<int>((transform_y(y) - yr.low) / (yr.high - yr.low) * (bottom - plot_top));
  };

  // Ticks and grid.
  for (double tick : linear_ticks(xr.low, xr.high, 8)) {
    const int x = px(tick);
    gdImageLine(image, x, plot_top + 1, x, bottom - 1, grid);
    const std::string label = format_tick(tick);
    draw_string(image, font, x - static_cast<int>(label.size()) * font->w / 2, bottom + 4, label,
                black);
  }
  std::vector<double> y_ticks;
  if (chart.log_y) {
    // Decades when the range spans several; 1-2-5 steps, or every digit, when it spans less.
    for (const std::vector<double>& mantissas :
         {std::vector<double>{1}, std::vector<double>{1, 2, 5},
          std::vector<double>{1, 2, 3, 4, 5, 6, 7, 8, 9}}) {
      y_ticks.clear();
      for (double decade = std::floor(yr.low); decade <= std::ceil(yr.high); decade += 1.0)
        for (double mantissa : mantissas) {
          const double tick = mantissa * std::pow(10.0, decade);
          if (std::log10(tick) >= yr.low && std::log10(tick) <= yr.high) y_ticks.push_back(tick);
        }
      if (y_ticks.size() >= 3) break;
    }
  } else {
    y_ticks = linear_ticks(yr.low, yr.high, 6);
  }
  {
    for (double tick : y_ticks) {
      const int y = py(tick);
      gdImageLine(image, left + 1, y, right - 1, y, grid);
      const std::string label = format_tick(tick);
      draw_string(image, font, left - 6 - static_cast<int>(label.size()) * font->w, y - font->h / 2,
                  label, black);
    }
  }
  gdImageRectangle(image, left, plot_top, right, bottom, black);
  draw_string(image, font,
              (left + right) / 2 - static_cast<int>(chart.x_label.size()) * font->w / 2,
              bottom + 20, chart.x_label, black);
  gdImageStringUp(image, font, 6,
                  (plot_top + bottom) / 2 + static_cast<int>(chart.y_label.size()) * font->w / 2,
                  reinterpret_cast<unsigned char*>(const_cast<char*>(chart.y_label.c_str())),
                  black);

  // Series, then the legend.
  gdImageSetThickness(image, 2);
  for (std::size_t s = 0; s < chart.series.size(); ++s) {
    const Series& series = chart.series[s];
    const int* rgb = kPalette[s % std::size(kPalette)];
    const int color = gdImageColorResolve(image, rgb[0], rgb[1], rgb[2]);
    bool have_previous = false;
    int previous_x = 0, previous_y = 0;
    for (std::size_t i = 0; i < series.x.size() && i < series.y.size(); ++i) {
      const double x = series.x[i], y = series.y[i];
      if (!std::isfinite(x) || !std::isfinite(y) || (chart.log_y && y <= 0)) {
        have_previous = false;
        continue;
      }
      const int cx = px(x), cy = py(y);
      if (have_previous) gdImageLine(image, previous_x, previous_y, cx, cy, color);
      if (series.points) gdImageFilledRectangle(image, cx - 2, cy - 2, cx + 2, cy + 2, color);
      previous_x = cx;
      previous_y = cy;
      have_previous = true;
    }
  }
  gdImageSetThickness(image, 1);
  // The legend sits in a white box in the top-right corner of the plot.
  std::size_t longest = 0;
  for (const Series& series : chart.series)
    longest = std::max(longest, series.name.size());
  const int box_right = right - 8, box_left = box_right - 40 - static_cast<int>(longest) * font->w;
  const int box_top = plot_top + 6;
  const int box_bottom = box_top + 8 + static_cast<int>(chart.series.size()) * (font->h + 4);
  gdImageFilledRectangle(image, box_left, box_top, box_right, box_bottom,
                         gdImageColorResolve(image, 255, 255, 255));
  gdImageRectangle(image, box_left, box_top, box_right, box_bottom,
                   gdImageColorResolve(image, 160, 160, 160));
  int legend_y = box_top + 6;
  for (std::size_t s = 0; s < chart.series.size(); ++s) {
    const int* rgb = kPalette[s % std::size(kPalette)];
    const int color = gdImageColorResolve(image, rgb[0], rgb[1], rgb[2]);
    const int x = box_left + 30;
    gdImageFilledRectangle(image, x - 22, legend_y + 4, x - 6, legend_y + 8, color);
    draw_string(image, font, x, legend_y, chart.series[s].name, black);
    legend_y += font->h + 4;
  }
}

}  // namespace

void write_png(const std::filesystem::path& path, const std::vector<Chart>& panels, int width,
               int panel_height) {
  KEPT_CHECK(!panels.empty(), path.string(), ": nothing to plot");
  const int height = panel_height * static_cast<int>(panels.size());
  std::unique_ptr<gdImage, void (*)(gdImagePtr)> image(gdImageCreateTrueColor(width, height),
                                                       gdImageDestroy);
  KEPT_CHECK(image != nullptr, path.string(), ": cannot allocate a ", width, "x", height, " image");
  gdImageFilledRectangle(image.get(), 0, 0, width - 1, height - 1,
                         gdImageColorResolve(image.get(), 255, 255, 255));
  for (std::size_t i = 0; i < panels.size(); ++i)
    draw_panel(image.get(), panels[i], static_cast<int>(i) * panel_height, width, panel_height);
  int size = 0;
  std::unique_ptr<void, void (*)(void*)> png(gdImagePngPtr(image.get(), &size), gdFree);
  KEPT_CHECK(png != nullptr && size > 0, path.string(), ": PNG encoding failed");
  write_file_atomically(path, std::span<const std::byte>(static_cast<const std::byte*>(png.get()),
                                                         static_cast<std::size_t>(size)));
}

}  // namespace kept::cli
