// reference/plot.hpp: line charts as PNG, for the pictures `kept opm` and `kept train` write.
//
// A person reads a curve faster than a table, so the commands that produce series (per-site
// conversion error, loss curves) also draw them. libgd (Debian's libgd-dev) does the
// rasterising and PNG encoding with its built-in bitmap fonts; this file only lays out axes,
// ticks, series and a legend. Charts can be stacked as panels in one image.
#pragma once

#include <filesystem>
#include <string>
#include <vector>

namespace kept::cli {

struct Series {
  std::string name;
  std::vector<double> x,
      y;                // equal lengths; non-finite points (and y <= 0 on a log axis) are skipped
  bool points = false;  // draw markers as well as the line
};

struct Chart {
  std::string title, x_label, y_label;
  bool log_y = false;
  std::vector<Series> series;
  // The x axis spans [x_low, x_high] when x_low < x_high (panels that share a step axis),
  // else the data's range.
  double x_low = 0, x_high = 0;
};

// Writes the charts one above the other into a PNG, atomically. Throws kept::Error naming the
// path on failure.
void write_png(const std::filesystem::path& path, const std::vector<Chart>& panels, int width = 960,
               int panel_height = 420);

}  // namespace kept::cli
