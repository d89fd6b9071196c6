# The install test (registered by tests/install.cmake): installs the current
# build into a fresh prefix, then builds the consumer program against it
#   1. as a CMake package: find_package(plasa CONFIG REQUIRED), plasa::plasa
#      and plasa::plasa_static;
#   2. with pkg-config: cc $(pkg-config --cflags --libs plasa), shared;
#   3. with pkg-config --static against libplasa.a;
# and runs every binary; each computes a tiny matmul + backward and checks it.
# cmake -DBUILD_DIR=... -DSRC_DIR=... -DWORK_DIR=... -DLIBDIR=... -DC_COMPILER=...
#       [-DC_FLAGS="..."] -DPKG_CONFIG=... -P run.cmake
cmake_minimum_required(VERSION 3.18)
foreach(v BUILD_DIR SRC_DIR WORK_DIR LIBDIR C_COMPILER PKG_CONFIG)
  if(NOT DEFINED ${v} OR "${${v}}" STREQUAL "")
    message(FATAL_ERROR "run.cmake: -D${v}=... is required")
  endif()
endforeach()
separate_arguments(c_flags UNIX_COMMAND "${C_FLAGS}")
set(prefix ${WORK_DIR}/prefix)
set(libdir ${prefix}/${LIBDIR})
file(REMOVE_RECURSE ${WORK_DIR})
file(MAKE_DIRECTORY ${WORK_DIR}/src)

# run(<what> <command...>): fails the test with the output if the command does.
function(run what)
  execute_process(COMMAND ${ARGN} RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
  if(NOT rc EQUAL 0)
    string(REPLACE ";" " " cmd "${ARGN}")
    message(FATAL_ERROR "${what} failed (${rc}): ${cmd}\n${out}\n${err}")
  endif()
  string(STRIP "${out}" out)
  set(run_out "${out}" PARENT_SCOPE)
endfunction()

function(check_consumer what)
  run("${what}" ${ARGN})
  if(NOT run_out MATCHES "^consumer: libplasa [0-9.]+ loss -4 grad 1 1 -1 -1: ok$")
    message(FATAL_ERROR "${what}: unexpected output: ${run_out}")
  endif()
  message(STATUS "${what}: ${run_out}")
endfunction()

run("cmake --install" ${CMAKE_COMMAND} --install ${BUILD_DIR} --prefix ${prefix})
foreach(f include/plasa.h ${LIBDIR}/libplasa.a ${LIBDIR}/pkgconfig/plasa.pc
          ${LIBDIR}/cmake/plasa/plasaConfig.cmake)
  if(NOT EXISTS ${prefix}/${f})
    message(FATAL_ERROR "not installed: ${f}")
  endif()
endforeach()
# plasa-generate (examples/plasa-generate) when the examples are built
if(EXISTS ${BUILD_DIR}/examples/plasa-generate/plasa-generate)
  if(NOT EXISTS ${prefix}/bin/plasa-generate)
    message(FATAL_ERROR "not installed: bin/plasa-generate")
  endif()
  run("plasa-generate --help" ${prefix}/bin/plasa-generate --help)
  if(NOT run_out MATCHES "^usage: plasa-generate CHECKPOINT")
    message(FATAL_ERROR "installed plasa-generate --help: ${run_out}")
  endif()
endif()
file(GLOB so ${libdir}/libplasa.so*)
if(NOT so)
  message(FATAL_ERROR "not installed: ${LIBDIR}/libplasa.so")
endif()
configure_file(${SRC_DIR}/CMakeLists.txt.in ${WORK_DIR}/src/CMakeLists.txt COPYONLY)
configure_file(${SRC_DIR}/consumer.c ${WORK_DIR}/src/consumer.c COPYONLY)

# 1. CMake package
run("configure the consumer" ${CMAKE_COMMAND} -S ${WORK_DIR}/src -B ${WORK_DIR}/cmake-build
    -DCMAKE_BUILD_TYPE=Release -DCMAKE_PREFIX_PATH=${prefix} -DCMAKE_C_COMPILER=${C_COMPILER}
    "-DCMAKE_C_FLAGS=${C_FLAGS}" "-DCMAKE_EXE_LINKER_FLAGS=${C_FLAGS}")
file(STRINGS ${WORK_DIR}/cmake-build/CMakeCache.txt found REGEX "^plasa_DIR:")
if(NOT found STREQUAL "plasa_DIR:PATH=${libdir}/cmake/plasa")
  message(FATAL_ERROR "find_package(plasa) found the wrong package: ${found}")
endif()
run("build the consumer" ${CMAKE_COMMAND} --build ${WORK_DIR}/cmake-build)
check_consumer("find_package, plasa::plasa" ${WORK_DIR}/cmake-build/consumer_shared)
check_consumer("find_package, plasa::plasa_static" ${WORK_DIR}/cmake-build/consumer_static)

# 2. pkg-config, shared library
set(ENV{PKG_CONFIG_PATH} ${libdir}/pkgconfig)
run("pkg-config --cflags --libs plasa" ${PKG_CONFIG} --cflags --libs plasa)
separate_arguments(pc UNIX_COMMAND "${run_out}")
if(NOT "-I${prefix}/include" IN_LIST pc OR NOT "-L${libdir}" IN_LIST pc)
  message(FATAL_ERROR "plasa.pc does not point into the prefix: ${run_out}")
endif()
run("cc with pkg-config" ${C_COMPILER} ${c_flags} ${WORK_DIR}/src/consumer.c
    -o ${WORK_DIR}/consumer_pc ${pc} -lm)
set(keep_ld "$ENV{LD_LIBRARY_PATH}")
set(ENV{LD_LIBRARY_PATH} "${libdir}:${keep_ld}")
check_consumer("pkg-config, shared" ${WORK_DIR}/consumer_pc)
set(ENV{LD_LIBRARY_PATH} "${keep_ld}")

# 3. pkg-config --static: libplasa.a plus its Libs.private; the binary runs
#    without the prefix on the library path.
run("pkg-config --static" ${PKG_CONFIG} --static --cflags --libs plasa)
separate_arguments(pc UNIX_COMMAND "${run_out}")
list(TRANSFORM pc REPLACE "^-lplasa$" "-l:libplasa.a")
run("cc with pkg-config --static" ${C_COMPILER} ${c_flags} ${WORK_DIR}/src/consumer.c
    -o ${WORK_DIR}/consumer_pc_static ${pc} -lm)
check_consumer("pkg-config --static" ${WORK_DIR}/consumer_pc_static)
